"""A chain that ends at a Gaussian fitted to the data (PriorGrad, Lee et al. 2022, "PriorGrad:
Improving Conditional Denoising Diffusion Models with Data-Dependent Adaptive Prior"; survey
sec. 3.2.1: a terminal distribution that keeps the data's statistics).

The chain estimates the data's per-dimension mean mu and standard deviation s once, before
training (float64 over the whole data set, s floored), standardizes the data,
y = (x - mu) / s, and runs the variance-preserving chain on y:

    y_t = alpha y0 + sigma z,   z ~ N(0, I),   alpha^2 + sigma^2 = 1.

Mapped back to data space, x_t = s y_t + mu has mean alpha x0 + (1 - alpha) mu and covariance
sigma^2 diag(s^2): the chain ends at N(mu, diag(s^2)) instead of N(0, I).

Why this is PriorGrad. PriorGrad perturbs x0 - mu with noise eps ~ N(0, Sigma),
x_t = alpha (x0 - mu) + sigma eps, starts sampling from N(0, Sigma) and trains with the
Sigma^{-1}-weighted loss ||eps - eps_hat||^2_{Sigma^{-1}} = (eps - eps_hat)^T Sigma^{-1} (eps - eps_hat)
(their eq. 6 and Algorithm 1). With Sigma = diag(s^2), write eps = s * z: then
x_t / s = alpha y0 + sigma z is exactly the standardized chain above, and
||eps - eps_hat||^2_{Sigma^{-1}} = ||(eps - eps_hat) / s||^2 = ||z - z_hat||^2 is the ordinary eps-MSE in
standardized coordinates. Sampling noise N(0, Sigma) is s times standard noise. So PriorGrad
is the plain VP chain, with the recipe's parameterization and weighting unchanged, seen
through the fixed affine map y = (x - mu) / s; the only difference is that the network reads
and writes standardized values (a fixed per-dimension rescaling of its input and output).

The statistics live in the chain module (``build_module``): ``fit`` computes them from the
pipeline's data before training (skipped when already fitted, e.g. on resume), the module's
buffers are stored in checkpoints, and a loaded run samples with the stored statistics.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, DataSpec, Level, hookimpl, noiselevel
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.config import doc, in_range
from fundiff.errors import FundiffError


def _vp_level(logsnr: float) -> Level:
    alpha, sigma = noiselevel.vp_alpha_sigma(float(logsnr))
    return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma if logsnr != math.inf else 0.0)


@attrs.frozen(kw_only=True)
class DataPrior(Chain):
    """VP chain on the standardized data: ends at N(mean, diag(std^2)) of the data (PriorGrad)."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    std_floor: float = attrs.field(
        default=0.01,
        validator=in_range(0.0, 1.0, low_open=True),
        metadata=doc(
            "each dimension's std is at least std_floor times the largest one, so dimensions that (almost) never vary "
            "are not blown up when standardized"
        ),
    )

    def check_recipe(self, components):
        denoiser = components.get("denoiser")
        if denoiser is not None and not type(denoiser).trainable:
            problem = (
                f"chain 'data-prior' runs on standardized data (x - mean) / std, but the untrained denoiser "
                f"'{type(denoiser).__name__}' computes its estimate for the data as given; use a trained denoiser "
                "(e.g. mlp), or chain: vp with this denoiser"
            )
            return [problem]
        return []

    def build_module(self, spec: DataSpec) -> FittedDataPrior:
        return FittedDataPrior(self, spec)

    # The component itself (what the recipe and the registry see) has the module's VP
    # marginals in standardized space; only the module knows the statistics.
    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.vp_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        return _vp_level(logsnr)

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        return noise


class FittedDataPrior(torch.nn.Module, Chain):
    """The data-prior chain with its statistics: buffers ``mean``, ``std`` (float64, the
    data's shape) and ``fitted``; the pipeline uses it in place of the recipe's component."""

    provides = DataPrior.provides

    def __init__(self, config: DataPrior, spec: DataSpec):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(spec.shape, dtype=torch.float64))
        self.register_buffer("std", torch.ones(spec.shape, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, pipeline) -> None:
        """Estimate mean and std of the pipeline's data in float64 (deterministic: the whole
        data set, no sampling); skipped when the statistics are already there."""
        if bool(self.fitted):
            return
        x = pipeline.data.x.to(torch.float64)
        if x.shape[1:] != self.mean.shape:
            raise FundiffError(
                f"chain 'data-prior': data of shape {tuple(x.shape[1:])}, but the chain was built for {tuple(self.mean.shape)}"
            )
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        largest = float(std.max())
        if not largest > 0.0:
            raise FundiffError(
                "chain 'data-prior': every dimension of the data is constant, so there is no spread to fit; use chain: vp"
            )
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=self.config.std_floor * largest))
        self.fitted.fill_(True)

    def _check_fitted(self, what: str) -> None:
        if not bool(self.fitted):
            raise FundiffError(
                f"chain 'data-prior' cannot {what} before its mean and std are fitted: train the recipe (fundiff train "
                "fits them first) or sample a trained run, whose checkpoint stores them"
            )

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        self._check_fitted("standardize data")
        return ((x0 - self.mean) / self.std).to(x0.dtype)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        self._check_fitted("map samples back to data")
        return (state * self.std + self.mean).to(state.dtype)

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.vp_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        return _vp_level(logsnr)

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        return 0.5 * noiselevel.vp_alpha_sigma(float(logsnr))[1] ** 2  # sigma^2 / 2 on a VP chain

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        # N(0, I) in standardized space = N(mean, diag(std^2)) in data space
        return noise


@hookimpl
def fundiff_register_chains(register):
    register("data-prior", DataPrior)
