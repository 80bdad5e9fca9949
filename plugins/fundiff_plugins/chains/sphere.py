"""Brownian motion on the unit sphere S^2 (De Bortoli et al. 2022, "Riemannian Score-Based
Generative Modelling", sec. 3-4; survey sec. 3.2, manifold chains).

State: unit vectors in R^3. The forward process is Brownian motion on S^2 with generator
Delta / 2 (Delta the Laplace-Beltrami operator) run for time t = sigma^2, so that for small
sigma it is x0 + sigma eps in the tangent plane, as on the ``ve`` chain.

Perturbation, the geodesic random walk (RSGM, sec. 3.1 and Algorithm 1 without drift):
``substeps`` = N steps x <- exp_x(sqrt(h) P_x z), z ~ N(0, I_3), h = t / N (P_x z is a standard
Gaussian on the tangent plane). It converges to Brownian motion as N grows (RSGM, Thm. 2). Its
one-step mean of <x_{k+1}, x0> is m(h) <x_k, x0> with m(h) = E[cos R] = 1 - h + h^2 / 3 - ...
(R the length of a 2-D Gaussian step of variance h per coordinate), so the walk has
E<x_t, x0> = m(h)^N = exp(-t - t^2 / (6 N) + O(t^3 / N^2)) where Brownian motion has exp(-t)
(the degree-1 spherical harmonics are eigenfunctions of Delta / 2 with eigenvalue -1). The
absolute gap t^2 exp(-t) / (6 N) is at most 4 exp(-2) / (6 N) ~ 0.09 / N for every t
(0.0028 at the default N = 32).

Training target: denoising score matching with the exact heat-kernel score (not only
Varadhan's leading term log_x(x0) / t, which is wrong by O(1) at large t, where it points at
x0 while the true score vanishes). With theta = d(x_t, x0) and p_t the heat kernel,
grad log p_t(x_t | x0) = g(theta, t) (x0 - cos(theta) x_t), where

* for t >= SWITCH_TIME (0.05), from the spectral expansion
  p_t(theta) = sum_l (2l + 1) / (4 pi) exp(-l (l + 1) t / 2) P_l(cos theta):
  g = sum_l w_l P_l'(cos theta) / sum_l w_l P_l(cos theta), w_l = (2l + 1) exp(-l (l + 1) t / 2),
  summed to l = LEGENDRE_TERMS (60); with |P_l| <= 1 and |P_l'| <= l (l + 1) / 2 the left-out
  terms of both sums are below 1e-35 at t = 0.05;
* for t < SWITCH_TIME, from the small-time (Minakshisundaram-Pleijel) expansion
  p_t ~ (2 pi t)^-1 exp(-theta^2 / (2 t)) (theta / sin theta)^(1/2) (1 + O(t)):
  g = theta / (t sin theta) - (1 / theta - cot theta) / (2 sin theta), Varadhan's term plus
  the Van Vleck correction. Against the series its relative error is below 2.1e-5 at
  t = 0.05 for theta <= 6 sqrt(t) (tested) and falls as t^3. Where the series cancels (theta
  far in the tail of a small t, its sum below 1e-8 of its terms) the expansion is used too.

The walk's kernel differs from the heat kernel by the O(t^2 / N) above, so the minimiser of
the loss is the marginal score of data perturbed by Brownian motion up to that gap.

Prior: uniform on S^2. The heat kernel's density relative to uniform is
sum_l w_l P_l(cos theta), within sum_{l>=1} (2l + 1) exp(-l (l + 1) t / 2) of 1 (3 exp(-t)
for large t); the recipe check refuses a schedule whose end leaves more than
``prior_tolerance`` (0.1 needs sigma_max >= 1.85).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Level, hookimpl
from fundiff.config import at_least, doc

from ._manifold import ManifoldChain, prior_tolerance_field

#: below this Brownian time t = sigma^2 the small-time expansion, above it the spectral series
SWITCH_TIME = 0.05
#: degrees l = 0 .. LEGENDRE_TERMS of the spectral series
LEGENDRE_TERMS = 60


def _theta_over_sin(theta: torch.Tensor) -> torch.Tensor:
    """theta / sin(theta), by its series 1 + theta^2 / 6 near 0."""
    small = theta < 1e-4
    safe = torch.where(small, torch.ones_like(theta), theta)
    return torch.where(small, 1.0 + theta * theta / 6.0, safe / torch.sin(safe))


def _van_vleck(theta: torch.Tensor) -> torch.Tensor:
    """(1 / theta - cot theta) / sin theta, by its series 1/3 + 7 theta^2 / 90 near 0."""
    small = theta < 1e-3
    safe = torch.where(small, torch.ones_like(theta), theta)
    direct = (1.0 / safe - torch.cos(safe) / torch.sin(safe)) / torch.sin(safe)
    return torch.where(small, 1.0 / 3.0 + 7.0 * theta * theta / 90.0, direct)


def heat_kernel_g(cos_theta: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g(theta, t) with grad log p_t(x | x0) = g (x0 - cos(theta) x) (module docstring);
    float64 tensors of one shape."""
    # small-time expansion; theta kept off pi, where it is meaningless and sin theta = 0
    theta_p = theta.clamp(max=math.pi - 1e-3)
    expansion = _theta_over_sin(theta_p) / t - 0.5 * _van_vleck(theta_p)
    if not bool((t >= SWITCH_TIME).any()):
        return expansion
    # spectral series at t clamped to where it converges within LEGENDRE_TERMS
    t_s = t.clamp(min=SWITCH_TIME)
    c = cos_theta
    p_prev, p = torch.ones_like(c), c
    dp_prev, dp = torch.zeros_like(c), torch.ones_like(c)
    w = 3.0 * torch.exp(-t_s)
    num, den = w * dp, 1.0 + w * p
    size = 1.0 + w * p.abs()
    for l in range(1, LEGENDRE_TERMS):
        # Bonnet's recursion and P'_{l+1} = P'_{l-1} + (2l + 1) P_l
        p_prev, p = p, ((2 * l + 1) * c * p - l * p_prev) / (l + 1)
        dp_prev, dp = dp, dp_prev + (2 * l + 1) * p_prev
        w = (2 * l + 3) * torch.exp(-0.5 * (l + 1) * (l + 2) * t_s)
        num = num + w * dp
        den = den + w * p
        size = size + w * p.abs()
    reliable = den > 1e-8 * size
    series = num / torch.where(reliable, den, torch.ones_like(den))
    return torch.where((t >= SWITCH_TIME) & reliable, series, expansion)


def heat_kernel_uniform_gap(t: float) -> float:
    """sum_{l>=1} (2l + 1) exp(-l (l + 1) t / 2): sup |4 pi p_t - 1| over the sphere."""
    total, l = 0.0, 1
    while True:
        term = (2 * l + 1) * math.exp(-0.5 * l * (l + 1) * t)
        total += term
        if term < 1e-17 * total:
            return total
        l += 1


def walk_mean_cosine(h: float) -> float:
    """m(h) = E[cos R] for a 2-D Gaussian step of variance h per coordinate:
    sum_k (-1)^k (2h)^k k! / (2k)!, from E[R^(2k)] = (2h)^k k!."""
    total, term, k = 1.0, 1.0, 0
    while True:
        term *= -(2.0 * h) * (k + 1) / ((2 * k + 1) * (2 * k + 2))
        k += 1
        total += term
        if abs(term) < 1e-18 * abs(total) or k > 500:
            return total


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, *([1] * (like.ndim - 1)))


@attrs.frozen(kw_only=True)
class Sphere(ManifoldChain):
    """Brownian motion on the unit sphere S^2 by a geodesic random walk; heat-kernel score matching; uniform prior."""

    name = "sphere"
    substeps: int = attrs.field(
        default=32,
        validator=at_least(1),
        metadata=doc("geodesic random walk steps per training perturbation (bias ~0.09 / substeps)"),
    )
    prior_tolerance: float = prior_tolerance_field()

    def data_problems(self, components):
        data = components.get("data")
        if data is not None and tuple(data.spec().shape) != (3,):
            message = (
                f"chain 'sphere' needs points in R^3 (projected onto the unit sphere), but the data set gives shape "
                f"{data.spec().shape}; use a data set of 3-vectors such as sphere-mixture"
            )
            return [message]
        return []

    # ---------------------------------------------------------------- data and prior

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Data points to unit vectors (x / |x|)."""
        return self.retract(x0)

    def retract(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x / norm.clamp_min(torch.finfo(x.dtype).tiny)

    def perturb(self, x0, noise, alpha, sigma):
        """One geodesic step exp_x0(sigma P_x0 eps) (the walk with a single substep; used where the
        pipeline hands one noise draw, e.g. truncated sampling from an init)."""
        return self.exp_map(x0, sigma * self.project_tangent(x0, noise))

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """Uniform on S^2 from standard normal noise: eps / |eps| (rotation invariance)."""
        return self.retract(noise)

    def uniform_state(self, u: torch.Tensor) -> torch.Tensor:
        """Archimedes: z = 1 - 2 u0 is uniform on [-1, 1] under the uniform measure, phi = 2 pi u1."""
        z = 1.0 - 2.0 * u[..., 0]
        phi = 2.0 * math.pi * u[..., 1]
        r = (1.0 - z * z).clamp(min=0.0).sqrt()
        return self.retract(torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1))

    def prior_error_bound(self, sigma: float, state_numel: int) -> float:
        return heat_kernel_uniform_gap(sigma * sigma)

    # ---------------------------------------------------------------- geometry

    def exp_map(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """cos|v| x + sin|v| v / |v|, renormalised (keeps |x| = 1 to rounding over many steps)."""
        r = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        small = r < 1e-4
        safe = torch.where(small, torch.ones_like(r), r)
        sinc = torch.where(small, 1.0 - r * r / 6.0, torch.sin(safe) / safe)
        return self.retract(torch.cos(r) * x + sinc * v)

    def project_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v - (x * v).sum(-1, keepdim=True) * x

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # atan2(|x cross y|, <x, y>) is accurate at every angle, unlike arccos near 0 and pi
        return torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(x, y), dim=-1), (x * y).sum(-1))

    def manifold_error(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.linalg.vector_norm(x, dim=-1) - 1.0).abs()

    # ---------------------------------------------------------------- kernel

    def walk(self, x0: torch.Tensor, sigma: torch.Tensor, noise) -> torch.Tensor:
        """The geodesic random walk of ``substeps`` steps (draws 0 .. substeps - 1)."""
        step = _per_sample(sigma / math.sqrt(self.substeps), x0)
        x = x0
        for j in range(self.substeps):
            x = self.exp_map(x, step * self.project_tangent(x, noise.sample(j)))
        return x

    def kernel_score(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cos_theta = (x_t * x0).sum(-1).clamp(-1.0, 1.0)
        theta = self.distance(x_t, x0)
        t = (sigma * sigma).to(x_t.dtype).reshape(cos_theta.shape)
        g = heat_kernel_g(cos_theta, theta, t)
        return g[..., None] * (x0 - cos_theta[..., None] * x_t)


@hookimpl
def fundiff_register_chains(register):
    register("sphere", Sphere)
