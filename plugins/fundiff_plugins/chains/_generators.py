"""Generators for the marginal at a truncation level (the ``truncated`` chain's extra model).

Two density models, each an ``nn.Module`` whose fitted state lives in buffers or parameters
(so a checkpoint of the chain holds it) and whose ``sample`` takes its randomness from
per-sample uniforms, so sample i never depends on the batch around it:

- :class:`MixtureGenerator`: a Gaussian mixture fitted by EM in float64 (Dempster, Laird
  and Rubin 1977; Bishop 2006, sec. 9.2.2), full or diagonal covariances;
- :class:`VAEGenerator`: a small MLP variational autoencoder with a Gaussian decoder
  (Kingma and Welling 2014), trained deterministically from counter-based random streams.

Standard normals are made from uniforms by the inverse normal CDF (``probit``), so a chain
can draw them from ``source.uniform`` whatever noise type the recipe uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import attrs
import torch
from torch import nn

from fundiff import rng

#: uniforms arrive in the sampling dtype; in float32 the largest value below 1 is 1 - 2^-24,
#: and a value rounded up to exactly 1 would have an infinite probit
_UNIFORM_MAX = 1.0 - 2.0**-24


def probit(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from uniforms on (0, 1): Phi^{-1}(u) = sqrt(2) erfinv(2u - 1), in
    float64 (uniforms clamped below 1 - 2^-24, which truncates the normal at 5.3 sigma)."""
    u = u.to(torch.float64).clamp(max=_UNIFORM_MAX)
    return math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)


#: ``normals(count)``: (B, count) float64 standard normals for a batch, per sample
Normals = Callable[[int], torch.Tensor]


# --------------------------------------------------------------------------------------
# Gaussian mixture by EM
# --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MixtureFit:
    """An EM result: mixture parameters (float64) and the per-iteration traces.

    ``objective`` is what EM provably never decreases: the mean log-likelihood plus the log
    prior that ``covariance_floor`` stands for (see :func:`fit_gaussian_mixture`);
    ``log_likelihood`` is the plain mean log-likelihood. Entry i is measured with the
    parameters before iteration i's M-step (entry 0: the initial parameters)."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    covariances: torch.Tensor  # (K, D, D) full, or (K, D) diagonal variances
    objective: list[float]
    log_likelihood: list[float]
    iterations: int


def _component_log_densities(x: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> torch.Tensor:
    """(N, K) log N(x_n; mu_k, Sigma_k) = -(D log 2pi + log|Sigma_k| + Mahalanobis^2) / 2, with
    Mahalanobis^2 = |L_k^{-1} (x - mu_k)|^2 through the Cholesky factor L_k (full) or the
    variances (diagonal); one component at a time, so memory stays O(N D)."""
    dim = x.shape[1]
    if covariances.ndim == 2:
        # sum_d (x_d - mu_d)^2 / v_d expanded into two (N, D) x (D, K) products (float64 keeps
        # the cancellation harmless unless |mu| / sigma is beyond ~1e6)
        precision = 1.0 / covariances
        maha = (x**2) @ precision.T - 2.0 * x @ (means * precision).T + (means**2 * precision).sum(1)
        logdet = torch.log(covariances).sum(1)
        return -0.5 * (dim * math.log(2.0 * math.pi) + logdet + maha.clamp(min=0.0))
    columns = []
    for k in range(means.shape[0]):
        chol = torch.linalg.cholesky(covariances[k])
        white = torch.linalg.solve_triangular(chol, (x - means[k]).T, upper=False)  # L^{-1} (x - mu), (D, N)
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        columns.append(-0.5 * (dim * math.log(2.0 * math.pi) + logdet + (white**2).sum(0)))
    return torch.stack(columns, dim=1)


def _kmeanspp_means(x: torch.Tensor, k: int, seed: int, stream: int) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): each new mean is a data point drawn
    with probability proportional to its squared distance to the nearest mean so far;
    the uniforms are Philox draws keyed by (seed, stream, k), so the seeding is deterministic."""
    n = x.shape[0]
    u = rng.uniform(seed, stream, 0, torch.arange(k)).to(torch.float64)
    chosen = [min(int(u[0] * n), n - 1)]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for j in range(1, k):
        cumulative = torch.cumsum(nearest, 0)
        if cumulative[-1] <= 0:  # fewer distinct points than components: reuse the first
            chosen.append(chosen[0])
            continue
        index = int(torch.searchsorted(cumulative, u[j] * cumulative[-1]).clamp(max=n - 1))
        chosen.append(index)
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(1))
    return x[chosen].clone()


def fit_gaussian_mixture(
    x: torch.Tensor,
    components: int,
    *,
    covariance: Literal["full", "diagonal"] = "full",
    iterations: int = 100,
    tolerance: float = 1e-9,
    covariance_floor: float = 1e-6,
    seed: int = 0,
    stream: int = 0,
) -> MixtureFit:
    """Fit a K-component Gaussian mixture to the rows of ``x`` by EM, in float64.

    Initialisation: k-means++ means (deterministic in ``seed``), every covariance the data's
    (full or diagonal), equal weights. E-step: responsibilities r_nk proportional to
    pi_k N(x_n; mu_k, Sigma_k), in log space. M-step (Bishop 2006, eq. 9.24-9.26):
    N_k = sum_n r_nk, pi_k = N_k / N, mu_k = sum_n r_nk x_n / N_k and

        Sigma_k = (S_k + eps I) / N_k,   S_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T

    (diagonal: the diagonal of that). ``eps = covariance_floor * mean data variance`` keeps
    every covariance positive definite; it is the MAP update under the fixed improper prior
    p(Sigma_k) proportional to exp(-tr(eps Sigma_k^{-1}) / 2), so EM never decreases the
    objective log-likelihood - sum_k tr(eps Sigma_k^{-1}) / 2 (with eps = 0: the plain
    log-likelihood). Stops after ``iterations`` or when the mean objective rises by less
    than ``tolerance``.
    """
    x = x.to(torch.float64)
    n, dim = x.shape
    k = components
    centered = x - x.mean(0)
    data_cov = centered.T @ centered / n
    eps = covariance_floor * float(torch.diagonal(data_cov).mean())
    eye = torch.eye(dim, dtype=torch.float64)
    means = _kmeanspp_means(x, k, seed, stream)
    if covariance == "full":
        covariances = (data_cov + eps * eye).expand(k, dim, dim).clone()
    else:
        covariances = (torch.diagonal(data_cov) + eps).expand(k, dim).clone()
    log_weights = torch.full((k,), -math.log(k), dtype=torch.float64)
    objective: list[float] = []
    log_likelihood: list[float] = []
    done = 0
    for done in range(1, iterations + 1):
        # E-step (and the objective of the current parameters, from the same densities)
        joint = log_weights[None, :] + _component_log_densities(x, means, covariances)
        per_point = torch.logsumexp(joint, dim=1)
        ll = float(per_point.mean())
        if covariance == "full":
            penalty = float(torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(covariances)), dim1=-2, dim2=-1).sum())
        else:
            penalty = float((1.0 / covariances).sum())
        log_likelihood.append(ll)
        objective.append(ll - 0.5 * eps * penalty / n)
        if len(objective) > 1 and objective[-1] - objective[-2] < tolerance:
            break
        resp = torch.exp(joint - per_point[:, None])  # (N, K)
        # M-step
        counts = resp.sum(0)  # N_k
        log_weights = torch.log(counts) - math.log(n)
        means = (resp.T @ x) / counts[:, None]
        if covariance == "full":
            scatter = []  # S_k, one component at a time (memory O(N D))
            for j in range(k):
                diff = x - means[j]
                scatter.append((diff * resp[:, j : j + 1]).T @ diff)
            covariances = (torch.stack(scatter) + eps * eye) / counts[:, None, None]
        else:
            # diag(S_k) = sum_n r_nk x_n^2 - N_k mu_k^2 (clamped: rounding cannot make it negative)
            scatter = (resp.T @ x**2 - counts[:, None] * means**2).clamp(min=0.0)
            covariances = (scatter + eps) / counts[:, None]
    return MixtureFit(
        weights=torch.exp(log_weights),
        means=means,
        covariances=covariances,
        objective=objective,
        log_likelihood=log_likelihood,
        iterations=done,
    )


class MixtureGenerator(nn.Module):
    """A Gaussian mixture as a generator: buffers ``log_weights`` (K,), ``means`` (K, D) and
    ``scales`` (K, D, D) lower Cholesky factors, or (K, D) standard deviations (diagonal)."""

    def __init__(self, components: int, dim: int, covariance: Literal["full", "diagonal"]):
        super().__init__()
        self.covariance = covariance
        self.register_buffer("log_weights", torch.full((components,), -math.log(components), dtype=torch.float64))
        self.register_buffer("means", torch.zeros(components, dim, dtype=torch.float64))
        scale_shape = (components, dim, dim) if covariance == "full" else (components, dim)
        scales = (
            torch.eye(dim, dtype=torch.float64).expand(scale_shape).clone()
            if covariance == "full"
            else torch.ones(scale_shape, dtype=torch.float64)
        )
        self.register_buffer("scales", scales)
        self.fit_report: MixtureFit | None = None  # the EM traces of the last fit (not saved)

    def fit(self, x: torch.Tensor, *, iterations: int, tolerance: float, covariance_floor: float, seed: int, stream: int) -> None:
        fit = fit_gaussian_mixture(
            x,
            self.means.shape[0],
            covariance=self.covariance,
            iterations=iterations,
            tolerance=tolerance,
            covariance_floor=covariance_floor,
            seed=seed,
            stream=stream,
        )
        self.log_weights.copy_(torch.log(fit.weights))
        self.means.copy_(fit.means)
        self.scales.copy_(torch.linalg.cholesky(fit.covariances) if self.covariance == "full" else fit.covariances.sqrt())
        self.fit_report = fit

    @torch.no_grad()
    def sample(self, choice: torch.Tensor, normals: Normals) -> torch.Tensor:
        """(B, D) float64 draws: component k = the first whose cumulative weight exceeds the
        sample's uniform ``choice`` (B,), then mu_k + L_k z with z = ``normals(D)``."""
        device = self.means.device
        cumulative = torch.cumsum(torch.exp(self.log_weights), 0)
        k = torch.searchsorted(cumulative, choice.to(device, torch.float64).contiguous() * cumulative[-1]).clamp(
            max=self.means.shape[0] - 1
        )
        z = normals(self.means.shape[1]).to(device)
        if self.covariance == "full":
            return self.means[k] + (self.scales[k] @ z[:, :, None])[:, :, 0]
        return self.means[k] + self.scales[k] * z

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) log p(x) of the fitted mixture, float64."""
        covariances = self.scales @ self.scales.transpose(1, 2) if self.covariance == "full" else self.scales**2
        joint = self.log_weights[None, :] + _component_log_densities(x.to(torch.float64), self.means, covariances)
        return torch.logsumexp(joint, dim=1)


# --------------------------------------------------------------------------------------
# Variational autoencoder
# --------------------------------------------------------------------------------------


def _mlp(inputs: int, width: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, outputs))


class VAEGenerator(nn.Module):
    """An MLP VAE with a Gaussian decoder of learned per-dimension scale.

    p(x) = integral N(x; mu(z), diag s^2) N(z; 0, I) dz, trained on the standardised data by
    the negative evidence lower bound (Kingma and Welling 2014, eq. 10):
    E_q[-log N(x; mu(z), s^2)] + KL(q(z | x) || N(0, I)), q(z | x) = N(m(x), diag v(x)),
    with the reparameterisation z = m + sqrt(v) eps. Sampling draws z ~ N(0, I) and
    x = mu(z) + s e, then undoes the standardisation.
    """

    def __init__(self, dim: int, latent_dim: int, width: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initial weights depend on the chain's seed alone
            self.encoder = _mlp(dim, width, 2 * latent_dim)
            self.decoder = _mlp(latent_dim, width, dim)
        self.latent_dim = latent_dim
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("data_mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("data_std", torch.ones(dim, dtype=torch.float64))
        self.losses: list[float] = []  # the training losses of the last fit (not saved)

    def negative_elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B,) negative ELBO per example (nats, without the constant D log(2 pi) / 2)."""
        m, log_v = self.encoder(x).chunk(2, dim=1)
        z = m + torch.exp(0.5 * log_v) * eps
        mu = self.decoder(z)
        reconstruction = (0.5 * ((x - mu) * torch.exp(-self.log_scale)) ** 2 + self.log_scale).sum(1)
        kl = 0.5 * (m**2 + torch.exp(log_v) - 1.0 - log_v).sum(1)
        return reconstruction + kl

    def fit(self, x: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int, stream: int) -> None:
        """Adam for ``steps`` steps on batches of the rows of ``x``; batch rows and the
        reparameterisation noise are Philox draws keyed by (seed, stream, step), so the fit
        is a function of its inputs."""
        device = self.log_scale.device
        x = x.to(torch.float64)
        self.data_mean.copy_(x.mean(0))
        self.data_std.copy_(x.std(0).clamp(min=1e-6))
        standard = ((x - x.mean(0)) / self.data_std.cpu()).float().to(device)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        positions = torch.arange(batch_size)
        self.losses = []
        with torch.enable_grad():
            for step in range(steps):
                rows = (rng.uniform(seed, stream, step, positions) * x.shape[0]).long()
                eps = rng.normal(seed, stream + 1, step, positions, (self.latent_dim,)).float().to(device)
                loss = self.negative_elbo(standard[rows.to(device)], eps).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.losses.append(float(loss.detach()))

    @torch.no_grad()
    def sample(self, normals: Normals) -> torch.Tensor:
        """(B, D) float64 draws from latent and observation normals ``normals(latent + D)``."""
        device = self.log_scale.device
        dim = self.log_scale.shape[0]
        z = normals(self.latent_dim + dim).to(device)
        latent, observation = z[:, : self.latent_dim], z[:, self.latent_dim :]
        mu = self.decoder(latent.float()).to(torch.float64)
        standard = mu + torch.exp(self.log_scale).to(torch.float64) * observation
        return self.data_mean + self.data_std * standard
