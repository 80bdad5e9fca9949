"""The discrete DDPM chain (Ho et al. 2020, sec. 2; survey sec. 3.2): a Markov chain of T steps

    q(x_k | x_{k-1}) = N(sqrt(1 - beta_k) x_{k-1}, beta_k I),    k = 1 .. T,

whose marginals q(x_k | x0) = N(sqrt(alpha_bar_k) x0, (1 - alpha_bar_k) I) are those of the
variance-preserving chain at the grid levels lambda_k = lambda(k / T) of the recipe's schedule.
The betas are derived from that grid, beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} with
alpha_bar_k = sigmoid(lambda_k), so they are never stored twice.

What makes the chain discrete:

* training (``training_logsnr``) moves every drawn level onto the grid: the weighting's draw
  is read as a time t = t(lambda) of the schedule, [t_min, 1] is cut into T equal cells and a
  draw in cell k trains at grid level k. Under ``uniform-t`` this is DDPM's k ~ U{1, .., T}
  (Algorithm 1) for any t_min; other weightings give each grid level their mass on its cell.
  The loss weight is evaluated at the grid level, a weight that ``draw`` adds at the drawn
  point (a rate d lambda / dt) stays the drawn point's.
* sampling (``sampling_levels``) moves every level of the sampler's grid to the nearest grid
  level k / T (duplicates dropped), so the ``ddpm`` sampler walks the chain's own steps; with
  ``steps: T`` it is DDPM's Algorithm 2 step for step.
* ``posterior(k, schedule)`` is q(x_{k-1} | x_k, x0) from the betas (DDPM eq. 6-7).

Between grid levels (the inner evaluations of multi-stage samplers) the chain is the VP chain
at that logSNR; a network trained on the grid alone has not seen those levels.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, DiscreteSchedule, Level, hookimpl, noiselevel
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc


@attrs.frozen(kw_only=True)
class DDPMChain(Chain):
    """DDPM's discrete Markov chain of ``num_steps`` steps on the schedule's grid t = k / T (VP marginals)."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    num_steps: int = attrs.field(default=1000, validator=at_least(1), metadata=doc("T, the number of steps of the chain"))

    def check_recipe(self, components):
        problems = []
        T = self.num_steps
        schedule = components.get("schedule")
        if isinstance(schedule, DiscreteSchedule) and schedule.num_steps % T != 0:
            problems.append(
                f"chain 'ddpm' has num_steps {T}, which does not divide the schedule's {schedule.num_steps} betas, so its "
                f"grid t = k / {T} falls between them; set chain.num_steps to {schedule.num_steps} or a divisor of it"
            )
        elif schedule is not None and 1.0 / T < float(schedule.t_min):
            problems.append(
                f"chain 'ddpm' has num_steps {T}: its first grid level t = 1/{T} is below the schedule's t_min = "
                f"{float(schedule.t_min):g}; use num_steps <= {math.floor(1.0 / float(schedule.t_min))}"
            )
        sampler = components.get("sampler")
        steps = getattr(sampler, "steps", None)
        if isinstance(steps, int) and steps > T:
            problems.append(
                f"chain 'ddpm' has {T} steps but sampler.steps is {steps}: the sampler can visit at most the chain's "
                f"{T} grid levels; set sampler.steps <= {T}"
            )
        return problems

    # ---------------------------------------------------------- VP marginals

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.vp_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = noiselevel.vp_alpha_sigma(float(logsnr))
        return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma if logsnr != math.inf else 0.0)

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        # alpha^2 = sigmoid(lambda): d log alpha / d lambda = sigmoid(-lambda) / 2 = sigma^2 / 2
        return 0.5 * noiselevel.vp_alpha_sigma(float(logsnr))[1] ** 2

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        # q(x_T | x0) = N(sqrt(alpha_bar_T) x0, (1 - alpha_bar_T) I) ~ N(0, I) (DDPM sec. 2)
        return noise

    # ---------------------------------------------------------- the grid

    def grid_logsnr(self, schedule) -> torch.Tensor:
        """lambda_k = lambda(k / T) for k = 0 .. T (float64, T + 1 values; lambda_0 = +inf, the data)."""
        ks = torch.arange(1, self.num_steps + 1, dtype=torch.float64)
        inner = schedule.logsnr(ks / self.num_steps).detach().to("cpu", torch.float64)
        return torch.cat([torch.full((1,), math.inf, dtype=torch.float64), inner])

    def log_alpha_bar(self, schedule) -> torch.Tensor:
        """log alpha_bar_k = log sigmoid(lambda_k) = -log(1 + e^{-lambda_k}) for k = 0 .. T."""
        return -torch.logaddexp(torch.zeros((), dtype=torch.float64), -self.grid_logsnr(schedule))

    def betas(self, schedule) -> torch.Tensor:
        """beta_1 .. beta_T = 1 - alpha_bar_k / alpha_bar_{k-1} (float64), by expm1 of the log ratio."""
        log_ab = self.log_alpha_bar(schedule)
        return -torch.expm1(log_ab[1:] - log_ab[:-1])

    def posterior(self, k: int, schedule) -> tuple[float, float, float]:
        """q(x_{k-1} | x_k, x0) = N(coef_x0 x0 + coef_xt x_k, var) for k in 1 .. T (DDPM eq. 6-7):

            coef_x0 = sqrt(alpha_bar_{k-1}) beta_k / (1 - alpha_bar_k),
            coef_xt = sqrt(1 - beta_k) (1 - alpha_bar_{k-1}) / (1 - alpha_bar_k),
            var     = beta_tilde_k = (1 - alpha_bar_{k-1}) / (1 - alpha_bar_k) beta_k,

        with 1 - alpha_bar = -expm1(log alpha_bar), exact near alpha_bar = 1."""
        if not 1 <= k <= self.num_steps:
            raise ValueError(f"chain 'ddpm': step k must be in 1 .. {self.num_steps}, got {k}")
        log_ab = self.log_alpha_bar(schedule)
        log_prev, log_now = float(log_ab[k - 1]), float(log_ab[k])
        beta = -math.expm1(log_now - log_prev)
        one_minus_prev, one_minus_now = -math.expm1(log_prev), -math.expm1(log_now)
        coef_x0 = math.exp(0.5 * log_prev) * beta / one_minus_now
        coef_xt = (
            math.exp(0.5 * (log_now - log_prev)) * one_minus_prev / one_minus_now
        )  # sqrt(1 - beta_k) = sqrt(ab_k / ab_{k-1})
        return coef_x0, coef_xt, one_minus_prev / one_minus_now * beta

    # ---------------------------------------------------------- discreteness

    def grid_index(self, logsnr: torch.Tensor, schedule) -> torch.Tensor:
        """The cell k in 1 .. T of each logSNR: t(lambda) in [t_min, 1] cut into T equal cells."""
        t = schedule.t_from_logsnr(logsnr.detach().to(torch.float64)).to(torch.float64)
        t_min = float(schedule.t_min)
        cell = torch.ceil((t - t_min) / (1.0 - t_min) * self.num_steps)
        return cell.clamp(1, self.num_steps)

    def training_logsnr(self, logsnr: torch.Tensor, schedule) -> torch.Tensor:
        k = self.grid_index(logsnr, schedule)
        return schedule.logsnr(k / self.num_steps).to(torch.float64)

    def sampling_levels(self, levels: list[Level], schedule) -> list[Level]:
        noisy = [level for level in levels if not level.is_clean]
        if not noisy:
            return levels
        t = schedule.t_from_logsnr(torch.tensor([level.logsnr for level in noisy], dtype=torch.float64))
        # the nearest grid level k / T; a grid that is already on it (t = 1 - i / steps with
        # steps dividing T) stays where it is, since rounding absorbs the ~1e-16 error of t
        ks = torch.round(t.to(torch.float64) * self.num_steps).clamp(1, self.num_steps).long().tolist()
        grid = self.grid_logsnr(schedule)
        kept: list[int] = []
        for k in ks:
            if not kept or k < kept[-1]:
                kept.append(k)
        return [self.level(float(grid[k])) for k in kept] + [level for level in levels if level.is_clean]


@hookimpl
def fundiff_register_chains(register):
    register("ddpm", DDPMChain)
