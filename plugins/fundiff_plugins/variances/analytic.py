"""Analytic-DPM reverse variance (Bao et al. 2022, "Analytic-DPM", Theorem 1, eq. 7 for the
DDPM case): the variance of the Gaussian p(x_s | x_t) that minimises the KL to the true
reverse marginal, given the model's mean, from one moment of the model's noise prediction.

With x0_hat = E[x0 | x_t], the true q(x_s | x_t) = E_{x0 | x_t} q(x_s | x_t, x0) has per-element
variance beta_tilde + c^2 E Var(x0 | x_t), c = the posterior's x0 coefficient (VDM eq. 7), and
E ||x0 - x0_hat||^2 / d = (sigma_t / alpha_t)^2 (1 - Gamma_t) with Gamma_t = E ||eps_hat(x_t)||^2 / d
(since E ||eps - eps_hat||^2 = E ||eps||^2 - E ||eps_hat||^2 for the conditional mean). So

    sigma*^2(s, t) = beta_tilde + (c sigma_t / alpha_t)^2 (1 - Gamma_t),

which is the paper's lambda^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda^2))^2
(1 - beta_bar_n Gamma_n) written in (alpha, sigma) levels (its Gamma is the score's moment,
ours the noise's: beta_bar Gamma_paper = Gamma here). Like the paper's clipping (sec. 4) the
result is clipped, here to [beta_tilde, beta] (beta = sigma_{t|s}^2, the ``fixed-large`` bound,
which sigma* reaches for unit-variance Gaussian data on a VP chain).

Gamma_t is estimated once per model by Monte Carlo in ``prepare``: ``batch`` data examples
perturbed to each of ``grid`` levels (the uniform spacing's noisy levels) through the model,
then interpolated linearly in logSNR (held constant beyond the grid). The table is stored in
the run directory as ``variance-analytic-<key>.safetensors``, keyed by the recipe's model
part, the sampling model's (and a learned schedule's) weights, ``sample.use_ema`` and these
parameters, so a retrained model is measured again. Unprepared (no pipeline), Gamma is that
of unit-variance Gaussian data, sigma^2 / (alpha^2 + sigma^2) (a model-free stand-in).
"""

from __future__ import annotations

import bisect
import os
from typing import Optional, Sequence

import attrs
import torch

from fundiff import FundiffError, ReverseVariance, hookimpl, noiselevel, rng
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

CACHE_PREFIX = "variance-analytic-"


def optimal_variance(s, t, gamma: float) -> float:
    """sigma*^2(s, t) before clipping, from Gamma_t = E ||eps_hat||^2 / d (eq. 7, see above)."""
    coef_x0, _, beta_tilde = noiselevel.posterior(s, t)
    return beta_tilde + (coef_x0 * t.sigma / t.alpha) ** 2 * (1.0 - gamma)


def clipped_variance(s, t, gamma: float) -> float:
    """sigma*^2 clipped to [beta_tilde, beta]; 0 at the clean level."""
    if s.is_clean:
        return 0.0
    beta_tilde = noiselevel.posterior(s, t)[2]
    beta = noiselevel.transition(s, t)[1]
    return min(max(optimal_variance(s, t, gamma), beta_tilde), beta)


def interpolate(logsnrs: Sequence[float], values: Sequence[float], logsnr: float) -> float:
    """Piecewise-linear interpolation in logSNR (``logsnrs`` increasing), constant outside."""
    if logsnr <= logsnrs[0]:
        return values[0]
    if logsnr >= logsnrs[-1]:
        return values[-1]
    k = bisect.bisect_right(logsnrs, logsnr)
    w = (logsnr - logsnrs[k - 1]) / (logsnrs[k] - logsnrs[k - 1])
    return values[k - 1] * (1.0 - w) + values[k] * w


class PreparedAnalytic(ReverseVariance):
    """An ``analytic`` variance with its measured Gamma table (what ``prepare`` returns)."""

    def __init__(self, component: "Analytic", logsnrs: list[float], gammas: list[float]):
        order = sorted(range(len(logsnrs)), key=lambda i: logsnrs[i])
        self.component = component
        self.logsnrs = [logsnrs[i] for i in order]
        self.gammas = [gammas[i] for i in order]

    def gamma(self, t) -> float:
        return interpolate(self.logsnrs, self.gammas, t.logsnr)

    def variance(self, s, t, v=None):
        return clipped_variance(s, t, self.gamma(t))


@attrs.frozen(kw_only=True)
class Analytic(ReverseVariance):
    """Analytic-DPM: beta_tilde + (c sigma_t / alpha_t)^2 (1 - E||eps_hat||^2 / d), clipped to [beta_tilde, beta]."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    grid: int = attrs.field(default=50, validator=at_least(1), metadata=doc("noise levels at which Gamma is estimated"))
    batch: int = attrs.field(default=256, validator=at_least(1), metadata=doc("calibration examples per level"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the calibration examples and noise"))

    def gamma(self, t) -> float:
        """The model-free stand-in: Gamma of unit-variance Gaussian data."""
        return t.sigma**2 / (t.alpha**2 + t.sigma**2)

    def variance(self, s, t, v=None):
        return clipped_variance(s, t, self.gamma(t))

    # ------------------------------------------------------------ with the model

    def grid_levels(self, pipeline):
        from fundiff.pipeline import noise_levels

        return noise_levels(pipeline.schedule, pipeline.chain, self.grid)[:-1]

    def cache_key(self, pipeline, logsnrs: list[float]) -> str:
        settings = {"use_ema": pipeline.recipe.sample.use_ema, "variance": attrs.asdict(self), "grid": logsnrs}
        return pipeline.cache_key(settings)

    @torch.no_grad()
    def measure(self, pipeline) -> torch.Tensor:
        """Gamma at each grid level: mean of eps_hat^2 over ``batch`` perturbed data examples."""
        from fundiff.pipeline import make_predict

        model = pipeline.sampling_model(pipeline.recipe.sample.use_ema)
        model.eval()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        data = pipeline.data
        ids = torch.arange(self.batch)
        index = (rng.uniform(self.seed, rng.STREAM_TRAIN_DATA, 0, ids) * data.x.shape[0]).long()
        x0 = data.x[index].to(pipeline.device, dtype)
        cond = data.labels[index].to(pipeline.device) if pipeline.uses_labels and data.labels is not None else None
        predict = make_predict(model, pipeline.parameterization)
        gammas = []
        for i, level in enumerate(self.grid_levels(pipeline)):
            stream = rng.NoiseStream(self.seed, ids, pipeline.spec.shape, stream=rng.STREAM_TRAIN_NOISE, device=pipeline.device, dtype=dtype)
            eps = pipeline.noise.sample(stream, i)
            x_t = level.alpha * x0 + level.sigma * eps
            x0_hat = predict(x_t, level, cond).to(torch.float64)
            eps_hat = (x_t.to(torch.float64) - level.alpha * x0_hat) / level.sigma
            gammas.append(float(eps_hat.pow(2).mean()))
        return torch.tensor(gammas, dtype=torch.float64)

    def prepare(self, pipeline, cache_dir: Optional[str]) -> PreparedAnalytic:
        from fundiff.checkpoint import load_checkpoint, save_checkpoint

        logsnrs = [lvl.logsnr for lvl in self.grid_levels(pipeline)]
        key = self.cache_key(pipeline, logsnrs)
        path = os.path.join(cache_dir, f"{CACHE_PREFIX}{key[:16]}.safetensors") if cache_dir else None
        if path is not None and os.path.exists(path):
            try:
                tensors, metadata = load_checkpoint(path)
                if metadata.get("key") == key and tensors["gamma"].shape == (len(logsnrs),):
                    return PreparedAnalytic(self, logsnrs, tensors["gamma"].to(torch.float64).tolist())
            except (FundiffError, KeyError):
                pass  # unreadable or foreign: measure again
        gammas = self.measure(pipeline)
        if path is not None:
            save_checkpoint(path, {"gamma": gammas}, {"key": key, "grid": str(self.grid), "batch": str(self.batch)})
        return PreparedAnalytic(self, logsnrs, gammas.tolist())


@hookimpl
def fundiff_register_variances(register):
    register("analytic", Analytic)
