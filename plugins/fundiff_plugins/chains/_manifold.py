"""What the manifold chains share (not a design: no entry point, nothing registered).

A manifold chain (survey sec. 3.2, "manifold" transition chains: torsional diffusion,
Riemannian score-based models) keeps its state on a Riemannian manifold M embedded in the
state tensor and perturbs data by Brownian motion on M, the process whose generator is half
the Laplace-Beltrami operator. Its noise level is the Brownian time tau = sigma^2, read from
the logSNR currency as on the variance-exploding chain (alpha = 1, sigma = exp(-lambda / 2)):
in the flat limit Brownian motion run for time sigma^2 is x0 + sigma eps, so the levels,
schedules, weightings and spacings mean the same thing as on ``ve`` for small sigma.

The maps a sampler reaches through ``level.chain`` (the ``"manifold-state"`` protocol, also
what ``fundiff.testing.check_chain`` and ``check_manifold_sampler`` exercise):

* ``exp_map(x, v)``: the point reached from x along the geodesic with initial velocity v
  (a tangent vector at x), kept on M to floating-point accuracy;
* ``project_tangent(x, v)``: the orthogonal projection of an ambient vector onto T_x M (a
  standard Gaussian in the ambient space projects to a standard Gaussian on T_x M);
* ``score(x, x0_hat, level)``: the model's score grad log p_sigma(x), a tangent vector,
  recovered from the denoiser's output. The recipe's parameterization must read the network
  output as the score (``score``: x0_hat = x + sigma^2 s at alpha = 1), so
  s = P_x((x0_hat - x) / sigma^2);
* ``kernel_score(x_t, x0, sigma)``: grad_{x_t} log p_sigma(x_t | x0) of the chain's
  perturbation kernel, the denoising score-matching target;
* ``walk(x0, sigma, noise)``: a draw from the perturbation kernel, random numbers from
  ``noise.sample(draw)`` (the training batch's per-sample streams);
* ``distance(x, y)`` (geodesic), ``manifold_error(x)`` (per-sample distance of a state from
  M, for checks), ``uniform_state(u)`` (the uniform distribution on M from uniforms).

Training is denoising score matching (Vincent 2011; Song and Ermon 2019, eq. 2, with their
lambda(sigma) = sigma^2 weight): for x_t ~ p_sigma(. | x0),

    L = sigma^2 || P_{x_t} s_theta(x_t, sigma) - grad log p_sigma(x_t | x0) ||^2,

whose minimiser over s_theta is E[grad log p_sigma(x_t | x0) | x_t] = grad log p_sigma(x_t),
the marginal score, on any manifold (De Bortoli et al. 2022, "Riemannian Score-Based
Generative Modelling", sec. 3.2). The squared norm is averaged over the state's elements as
the Gaussian loss is. The recipe's weighting draws the levels (its density over logSNR);
its loss weight ``log_x0_weight`` is a weight on a Gaussian x0-MSE and is not used here.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import attrs
import torch

from fundiff import Chain, Level, noiselevel
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_NOISE, MANIFOLD_STATE, TrainingBatch
from fundiff.config import doc, in_range


def prior_tolerance_field():
    return attrs.field(
        default=0.1,
        validator=in_range(0.0, 1.0, low_open=True),
        metadata=doc(
            "largest relative density error of the uniform prior at the schedule's terminal level that the recipe "
            "check accepts (sup |p_sigma_max / uniform - 1|, bounded in closed form)"
        ),
    )


class ManifoldChain(Chain):
    """Base of the manifold chains: levels as on ``ve``, uniform prior, denoising score
    matching with the kernel's score, and the recipe checks they share."""

    provides = frozenset({MANIFOLD_STATE})
    requires = frozenset({GAUSSIAN_NOISE})
    #: the registered name, for messages
    name: ClassVar[str] = ""

    # ------------------------------------------------------------------ levels

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.ve_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = noiselevel.ve_alpha_sigma(float(logsnr))
        return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma if logsnr != math.inf else 0.0)

    # ------------------------------------------------------------------ geometry

    @abc.abstractmethod
    def exp_map(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def project_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Geodesic distance per sample, shape (B,)."""

    @abc.abstractmethod
    def manifold_error(self, x: torch.Tensor) -> torch.Tensor:
        """How far each state lies from the manifold, shape (B,) (0 on it)."""

    @abc.abstractmethod
    def uniform_state(self, u: torch.Tensor) -> torch.Tensor:
        """The uniform distribution on the manifold from uniforms u in (0, 1) of the state's shape."""

    @abc.abstractmethod
    def kernel_score(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} log p_sigma(x_t | x0) (a tangent vector at x_t); ``sigma`` has shape (B,)."""

    @abc.abstractmethod
    def walk(self, x0: torch.Tensor, sigma: torch.Tensor, noise: Any) -> torch.Tensor:
        """A draw from p_sigma(. | x0) with Gaussian numbers from ``noise.sample(draw)``."""

    @abc.abstractmethod
    def prior_error_bound(self, sigma: float, state_numel: int) -> float:
        """An upper bound on sup |p_sigma(x | x0) / uniform(x) - 1| over x and x0: how far the
        uniform prior is from every perturbed data distribution at level sigma."""

    # ------------------------------------------------------------------ shared maps

    def score(self, x: torch.Tensor, x0_hat: torch.Tensor, level: Level) -> torch.Tensor:
        """The model's score from the denoiser's x0 estimate: the score parameterization gives
        x0_hat = x + sigma^2 s (Tweedie's form at alpha = 1), so s = P_x((x0_hat - x) / sigma^2)."""
        return self.project_tangent(x, (x0_hat - x) * (1.0 / level.sigma**2))

    def denoised(self, x: torch.Tensor, score: torch.Tensor, level: Level) -> torch.Tensor:
        """The point exp_x(sigma^2 s): to first order in sigma the mode of p(x0 | x) (Varadhan:
        sigma^2 grad log p_sigma(x | x0) -> log_x(x0) as sigma -> 0), on the manifold."""
        return self.exp_map(x, level.sigma**2 * score)

    def initial_state(self, level: Level, source: Any) -> torch.Tensor:
        """Uniform on the manifold, from the source's per-sample uniforms (draw 0)."""
        return self.uniform_state(source.uniform(0))

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Back onto the manifold: the nearest point (a truncated sample that ends on a
        denoiser estimate x + sigma^2 s leaves it)."""
        return self.retract(state)

    def retract(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the manifold (identity on it)."""
        return x

    # ------------------------------------------------------------------ training

    def training_losses(self, batch: TrainingBatch) -> torch.Tensor:
        """Denoising score matching with the kernel's score, weighted by sigma^2 (module docstring)."""
        x0 = batch.x0
        sigma = torch.exp(-0.5 * batch.logsnr.to(torch.float64)).to(x0.device)
        x_t = self.walk(x0, sigma.to(x0.dtype), batch.noise)
        # the target in float64: its small-sigma form is a difference of nearby angles / points
        target = self.kernel_score(x_t.to(torch.float64), x0.to(torch.float64), sigma).to(x0.dtype)
        out = batch.network(x_t, batch.logsnr.to(x0.device, x0.dtype), batch.cond).to(x0.dtype)
        # only the tangent part of the output is a score (an ambient normal part is ignored)
        residual = self.project_tangent(x_t, out) - target
        weight = (sigma * sigma).to(x0.dtype)
        return weight * (residual * residual).flatten(1).mean(1)

    # ------------------------------------------------------------------ recipe checks

    def data_problems(self, components: dict) -> list[str]:
        """Problems with the data set's shape (each chain its own)."""
        return []

    def check_recipe(self, components: dict) -> list[str]:
        problems = self.data_problems(components)
        param = components.get("parameterization")
        if param is not None and not _reads_output_as_score(param):
            problems.append(
                f"chain '{self.name}' trains the network to predict the score on the manifold (denoising score matching "
                f"with its kernel's score) and reads it back as x0_hat = x + sigma^2 score, but parameterization "
                f"'{type(param).__name__}' assumes Euclidean noise (x_t = alpha x0 + sigma eps); use parameterization: score"
            )
        noise = components.get("noise")
        if noise is not None and CORRUPTION_OPERATOR in type(noise).provides:
            problems.append(
                f"chain '{self.name}' perturbs by Brownian motion on the manifold and has no corruption operator; "
                f"noise '{type(noise).__name__}' degrades x0 first; use noise: gaussian"
            )
        if components.get("variance") is not None:
            problems.append(
                f"chain '{self.name}' has no Gaussian reverse variance to choose: its geodesic-random-walk sampler "
                "steps with the Brownian variance sigma_t^2 - sigma_s^2; remove the 'variance' section"
            )
        schedule = components.get("schedule")
        if schedule is not None:
            terminal = schedule.logsnr_at(1.0)
            if terminal == -math.inf:
                problems.append(
                    f"chain '{self.name}' cannot start at zero SNR: its Brownian time sigma^2 = exp(-lambda) is infinite "
                    f"at the schedule's terminal logSNR of -inf; use a schedule with a finite end, e.g. exponential"
                )
            else:
                problems.extend(self._prior_problems(math.exp(-0.5 * terminal), components))
        return problems

    def _prior_problems(self, sigma_max: float, components: dict) -> list[str]:
        data = components.get("data")
        numel = data.spec().numel if data is not None else 1
        bound = self.prior_error_bound(sigma_max, numel)
        if bound <= self.prior_tolerance:
            return []
        # the smallest terminal sigma that passes, by doubling then bisection on the bound
        lo, hi = sigma_max, max(2.0 * sigma_max, 1.0)
        while self.prior_error_bound(hi, numel) > self.prior_tolerance:
            lo, hi = hi, 2.0 * hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.prior_error_bound(mid, numel) > self.prior_tolerance else (lo, mid)
        message = (
            f"chain '{self.name}' starts sampling from the uniform prior, but at the schedule's terminal sigma = "
            f"{sigma_max:.4g} the perturbed data still differ from uniform by up to {bound:.3g} (relative density, "
            f"chain.prior_tolerance = {self.prior_tolerance}); end the schedule at sigma >= {hi:.3g} (e.g. schedule: "
            f"{{name: exponential, sigma_max: {math.ceil(hi * 100) / 100}}}) or raise prior_tolerance"
        )
        return [message]


def _reads_output_as_score(param: Any) -> bool:
    """Probe: at alpha = 1 the parameterization feeds x_t unscaled to the network and turns
    its output s into x0_hat = x_t + sigma^2 s (score prediction, Tweedie's form)."""
    x_t = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    out = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    one = torch.ones((1, 1), dtype=torch.float64)
    sigma = torch.full((1, 1), 0.7, dtype=torch.float64)
    try:
        scale = param.input_scale(one, sigma)
        scale_ok = bool(torch.all(torch.as_tensor(scale, dtype=torch.float64) == 1.0))
        x0_hat = param.to_x0(out, x_t, one, sigma)
        return scale_ok and bool(torch.allclose(x0_hat, x_t + 0.49 * out, rtol=1e-12, atol=1e-12))
    except Exception:  # noqa: BLE001 - a parameterization that cannot run the probe does not read a score either
        return False
