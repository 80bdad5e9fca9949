"""Critically-damped Langevin diffusion (CLD; Dockhorn, Vahdat and Kreis 2022, "Score-based
generative modeling with critically-damped Langevin diffusion"; survey sec. 3.2.2, the
systematic method with a physics-inspired pair of chains).

The state u = (x, v) couples the data x to a velocity v of the same shape; they are
concatenated along axis 1 (points (D,) -> (2D,), images (C, H, W) -> (2C, H, W)). In the
integrated time B = beta t the forward SDE is (paper sec. 3, per dimension)

    dx = v / M dB,    dv = (-x - Gamma v / M) dB + sqrt(2 Gamma) dW_B,

critically damped (Gamma^2 = 4 M): the drift matrix F = [[0, 1/M], [-1, -Gamma/M]] has the
double eigenvalue -c with c = Gamma / (2 M) = 1 / sqrt(M), so exp(F B) is exact in closed form
and the equilibrium is N(0, diag(1, M)), the prior. Only v receives noise; x is driven by v.

Perturbation kernel (derived in the paper's appendix B; written here without cancellation).
With v0 ~ N(0, gamma M) independent of x0 (hybrid score matching conditions on x0 only, so v0
is part of the kernel's covariance):

    mean = (f x0, g x0),  f = e^{-cB} (1 + c B),  g = -B e^{-cB}
    Sigma = w w^T + S,  w = sqrt(gamma M) e^{-cB} (B / M, 1 - c B)
    S = 2 Gamma [[I2 / M^2, (I1 - c I2) / M], [., I0 - 2c I1 + c^2 I2]],
    I_k = int_0^B r^k e^{-2cr} dr = k! / (2c)^{k+1} P(k + 1, 2cB),

P the regularised lower incomplete gamma function (accurate for small B, where the usual
closed forms lose every digit to cancellation: Sigma_xx ~ gamma B^2 / M). The determinant is
det S + w^T adj(S) w (matrix determinant lemma), again without cancellation. The paper adds a
numerical epsilon to Sigma_xx and Sigma_vv instead; these forms need none. The kernel's
Cholesky factor L = [[L_xx, 0], [L_xv, L_vv]] has L_vv = sqrt(det / Sigma_xx) = 1 / ell_t.

Noise level: the level's (alpha, sigma) are the x-marginal's, alpha = f and sigma^2 = Sigma_xx,
so lambda = log(f^2 / Sigma_xx) is the logSNR of the data coordinates; it falls strictly from
+inf at B = 0 to -inf as B -> inf (f falls and Sigma_xx rises for gamma < 2), so every schedule,
weighting and spacing of the recipe maps to CLD time: B(lambda) is found in float64 from a
table in log B refined by Newton steps. Sampling starts at the horizon B_T = beta T (the
paper's T = 1) from the prior, whatever the schedule's noisiest level, and training draws
noisier than the horizon are moved to it (``training_logsnr``).

Training (the paper's hybrid score matching, HSM, with the weighting lambda(t) = ell_t^{-2}):
the velocity score of the kernel is grad_v log p(u_t | x0) = -ell_t eps_v, so the network, through the
``eps`` parameterization, predicts the standardised noise eps = L^{-1}(u_t - mean) of the
joint state; the loss is the mean of (eps_v_hat - eps_v)^2 over the velocity half. With
``mixed_score`` (the paper's default) the network predicts the residual of eps_v after the
velocity score of N(0, Sigma_vv): score_v = -v / Sigma_vv - ell_t * out_v. The position half
of the output is trained (eps_x) only with ``position_weight`` > 0.

Sampling (``cld-sscs``) reaches the chain through ``level.chain``: ``velocity_score`` turns the
sampler's ``denoise`` output back into the velocity score, ``reverse_linear_step`` and
``score_step`` are the two parts of the reverse SDE that the symmetric splitting composes.
``decode`` returns the position half.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import attrs
import torch

from fundiff import Chain, Level, Schedule, hookimpl
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_NOISE, DataSpec
from fundiff.config import doc, greater_than, in_range
from fundiff.errors import FundiffError

#: capability of the cld chain: a (position, velocity) state whose samplers use its dynamics
CLD_STATE = "cld-state"

# log B of the inversion table: B from 4e-18 (lambda ~ 80 + log(M / gamma)) to 1.6e5
_LOG_B_RANGE = (-40.0, 12.0)
_TABLE_SIZE = 4001
_NEWTON_STEPS = 3
_B_CAP = 1.0e6  # larger B is equilibrium to float64: exp(-2cB) underflows for any sane mass


class Kernel(NamedTuple):
    """The perturbation kernel at integrated time B, per dimension (float64 tensors)."""

    mean_x: torch.Tensor  # f: x_t's mean is f x0
    mean_v: torch.Tensor  # g: v_t's mean is g x0
    xx: torch.Tensor
    xv: torch.Tensor
    vv: torch.Tensor
    det: torch.Tensor  # xx vv - xv^2, without cancellation


def _integrals(b: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """I_k = int_0^B r^k e^{-2cr} dr for k = 0, 1, 2, as k! / (2c)^{k+1} P(k + 1, 2cB)."""
    z = 2.0 * c * b
    i0 = torch.special.gammainc(torch.ones_like(z), z) / (2.0 * c)
    i1 = torch.special.gammainc(torch.full_like(z, 2.0), z) / (2.0 * c) ** 2
    i2 = 2.0 * torch.special.gammainc(torch.full_like(z, 3.0), z) / (2.0 * c) ** 3
    return i0, i1, i2


def _noise_covariance(b: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S(B) = int_0^B exp(F r) diag(0, 2 Gamma) exp(F r)^T dr: (S_xx, S_xv, S_vv), the
    covariance the SDE's own noise builds up from a point start."""
    c = 1.0 / math.sqrt(mass)
    two_gamma = 4.0 * math.sqrt(mass)  # 2 Gamma with Gamma = 2 sqrt(M)
    i0, i1, i2 = _integrals(b, c)
    return two_gamma * i2 / mass**2, two_gamma * (i1 - c * i2) / mass, two_gamma * (i0 - 2.0 * c * i1 + c * c * i2)


def kernel(b: torch.Tensor, mass: float, gamma: float) -> Kernel:
    """Mean coefficients and covariance of q(u_B | x0) with v0 ~ N(0, gamma M) (float64)."""
    b = torch.as_tensor(b, dtype=torch.float64).clamp(0.0, _B_CAP)
    c = 1.0 / math.sqrt(mass)
    decay = torch.exp(-c * b)
    mean_x = decay * (1.0 + c * b)
    mean_v = -b * decay
    s_xx, s_xv, s_vv = _noise_covariance(b, mass)
    # w = sqrt(gamma M) exp(F B) e_v: the initial velocity's spread carried to time B
    scale = math.sqrt(gamma * mass)
    w_x, w_v = scale * decay * b / mass, scale * decay * (1.0 - c * b)
    det = (s_xx * s_vv - s_xv * s_xv) + (w_x * w_x * s_vv - 2.0 * w_x * w_v * s_xv + w_v * w_v * s_xx)
    return Kernel(mean_x, mean_v, s_xx + w_x * w_x, s_xv + w_x * w_v, s_vv + w_v * w_v, det)


def cholesky(k: Kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_xx, L_xv, L_vv) with L L^T = Sigma. At B = 0 (Sigma_xx = 0) the limit B -> 0 is
    taken: x and v noise are fully correlated there, L_xv = sqrt(Sigma_vv), L_vv = 0."""
    l_xx = k.xx.sqrt()
    positive = k.xx > 0
    safe = torch.where(positive, k.xx, torch.ones_like(k.xx))
    l_xv = torch.where(positive, k.xv / safe.sqrt(), k.vv.sqrt())
    l_vv = torch.where(positive, (k.det / safe).clamp(min=0.0).sqrt(), torch.zeros_like(k.xx))
    return l_xx, l_xv, l_vv


def _log_mean_x(b: torch.Tensor, mass: float) -> torch.Tensor:
    """log f = -cB + log(1 + cB), finite where f itself underflows."""
    cb = b / math.sqrt(mass)
    return torch.log1p(cb) - cb


def logsnr_at(b: torch.Tensor, mass: float, gamma: float) -> torch.Tensor:
    """lambda(B) = log(f^2 / Sigma_xx), the logSNR of the position coordinates."""
    b = torch.as_tensor(b, dtype=torch.float64)
    lam = _log_mean_x(b.clamp(0.0, _B_CAP), mass) * 2.0 - torch.log(kernel(b, mass, gamma).xx)
    lam = torch.where(b <= 0, torch.full_like(lam, math.inf), lam)
    return torch.where(torch.isinf(b), torch.full_like(lam, -math.inf), lam)


def _position_variance(b: torch.Tensor, mass: float, gamma: float) -> torch.Tensor:
    """Sigma_xx alone (the inversion's inner loop): (gamma / M) e^{-2cB} B^2 + 2 Gamma I2 / M^2."""
    c = 1.0 / math.sqrt(mass)
    i2 = 2.0 * torch.special.gammainc(torch.full_like(b, 3.0), 2.0 * c * b) / (2.0 * c) ** 3
    return (gamma / mass) * torch.exp(-2.0 * c * b) * b * b + 4.0 * math.sqrt(mass) * i2 / mass**2


def _logsnr_and_slope(log_b: torch.Tensor, mass: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda and d lambda / d log B, for Newton steps in log B."""
    b = torch.exp(log_b)
    c = 1.0 / math.sqrt(mass)
    xx = _position_variance(b, mass, gamma)
    lam = 2.0 * _log_mean_x(b, mass) - torch.log(xx)
    # d log f / dB = -c^2 B / (1 + cB); d Sigma_xx / dB = e^{-2cB} (2 gamma B (1 - cB) / M + 2 Gamma B^2 / M^2)
    dlog_f = -(c * c) * b / (1.0 + c * b)
    dxx = torch.exp(-2.0 * c * b) * (2.0 * gamma * b * (1.0 - c * b) / mass + 4.0 * math.sqrt(mass) * b * b / mass**2)
    return lam, b * (2.0 * dlog_f - dxx / xx)


@functools.lru_cache(maxsize=16)
def _table(mass: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log B grid, -lambda on it), -lambda increasing, for the inversion's first guess."""
    log_b = torch.linspace(*_LOG_B_RANGE, _TABLE_SIZE, dtype=torch.float64)
    lam, _ = _logsnr_and_slope(log_b, mass, gamma)
    return log_b, -lam


def time_from_logsnr(logsnr: torch.Tensor, mass: float, gamma: float) -> torch.Tensor:
    """B(lambda), the inverse of :func:`logsnr_at` (float64; +inf -> 0, -inf -> inf).

    A first guess interpolated in a table of log B, then Newton steps on lambda(log B), whose
    slope is -2 at small B (lambda ~ log(M / (gamma B^2))) and -2cB at large B; the result
    satisfies logsnr_at(B) = lambda to a few float64 roundings of lambda."""
    lam = torch.as_tensor(logsnr, dtype=torch.float64)
    log_b_grid, neg_lam_grid = _table(mass, gamma)
    log_b_grid, neg_lam_grid = log_b_grid.to(lam.device), neg_lam_grid.to(lam.device)
    finite = torch.isfinite(lam)
    target = torch.where(finite, lam, torch.zeros_like(lam))
    clipped = (-target).clamp(float(neg_lam_grid[0]), float(neg_lam_grid[-1]))
    hi = torch.searchsorted(neg_lam_grid, clipped).clamp(1, _TABLE_SIZE - 1)
    lo = hi - 1
    frac = (clipped - neg_lam_grid[lo]) / (neg_lam_grid[hi] - neg_lam_grid[lo])
    log_b = log_b_grid[lo] + frac * (log_b_grid[hi] - log_b_grid[lo])
    for _ in range(_NEWTON_STEPS):
        value, slope = _logsnr_and_slope(log_b, mass, gamma)
        log_b = (log_b - (value - target) / slope).clamp(_LOG_B_RANGE[0] - 60.0, math.log(_B_CAP))
    b = torch.exp(log_b)
    b = torch.where(lam == math.inf, torch.zeros_like(b), b)
    return torch.where(lam == -math.inf, torch.full_like(b, math.inf), b)


def _split(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = state.shape[1] // 2
    return state[:, :half], state[:, half:]


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) float64 coefficient as (B, 1, ...) in ``like``'s dtype and device."""
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)).to(like.device, like.dtype)


def _is_eps_prediction(param) -> bool:
    """Whether a parameterization predicts the noise: target = eps, x0 = (x_t - sigma out) / alpha
    and no input scaling (checked on a probe, so third-party eps parameterizations pass)."""
    gen = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(3, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    alpha = torch.tensor([[0.3], [0.8], [0.95]], dtype=torch.float64)
    sigma = torch.tensor([[0.9], [0.5], [0.2]], dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    try:
        scale = param.input_scale(alpha, sigma)
        ok = torch.allclose(torch.as_tensor(scale, dtype=torch.float64), torch.ones((), dtype=torch.float64))
        ok = ok and torch.allclose(param.target(x0, eps, x_t, alpha, sigma), eps)
        return ok and torch.allclose(param.to_x0(out, x_t, alpha, sigma), (x_t - sigma * out) / alpha)
    except Exception:  # noqa: BLE001 - a parameterization that cannot even run the probe is not eps
        return False


@functools.lru_cache(maxsize=4096)
def _host_kernel(b: float, mass: float, gamma: float) -> tuple[Kernel, float, float, float]:
    k = kernel(torch.tensor([b], dtype=torch.float64), mass, gamma)
    chol = cholesky(k)
    return Kernel(*(float(t) for t in k)), *(float(t) for t in chol)


@functools.lru_cache(maxsize=4096)
def _host_logsnr(b: float, mass: float, gamma: float) -> float:
    return float(logsnr_at(torch.tensor([b], dtype=torch.float64), mass, gamma)[0])


@functools.lru_cache(maxsize=4096)
def _host_time(logsnr: float, mass: float, gamma: float) -> float:
    return float(time_from_logsnr(torch.tensor([logsnr], dtype=torch.float64), mass, gamma)[0])


@attrs.frozen(kw_only=True)
class CriticallyDampedLangevin(Chain):
    """Critically-damped Langevin diffusion on (x, v): hybrid score matching of the velocity score."""

    provides = frozenset({CLD_STATE})
    requires = frozenset({GAUSSIAN_NOISE})

    beta: float = attrs.field(default=4.0, validator=greater_than(0.0), metadata=doc("time scaling beta: B = beta t (paper: 4)"))
    mass: float = attrs.field(
        default=0.25, validator=greater_than(0.0), metadata=doc("velocity mass M; damping Gamma = 2 sqrt(M) (paper: 0.25)")
    )
    gamma: float = attrs.field(
        default=0.04,
        validator=in_range(0.0, 1.0, low_open=True),
        metadata=doc("initial velocity variance as a fraction of M: v0 ~ N(0, gamma M) (paper: 0.04)"),
    )
    horizon: float = attrs.field(
        default=1.0, validator=greater_than(0.0), metadata=doc("T, the time of the prior N(0, diag(1, M)) (paper: 1)")
    )
    mixed_score: bool = attrs.field(
        default=True,
        metadata=doc("the network predicts the velocity score's residual after -v / Sigma_vv (the paper's mixed score)"),
    )
    position_weight: float = attrs.field(
        default=0.0,
        validator=in_range(0.0, math.inf),
        metadata=doc(
            "weight of an eps-loss on the position half of the output (0: the paper's HSM; > 0 makes the x0 estimate usable)"
        ),
    )

    # ---------------------------------------------------------------- recipe check

    def check_recipe(self, components):
        problems = []
        param = components.get("parameterization")
        if param is not None and not _is_eps_prediction(param):
            problems.append(
                "chain 'cld' trains its network on the noise of the joint (x, v) state (hybrid score matching), so the "
                "parameterization must predict eps with no input scaling; use parameterization: eps"
            )
        noise = components.get("noise")
        if noise is not None and CORRUPTION_OPERATOR in type(noise).provides:
            problems.append(
                "chain 'cld' perturbs with its own closed-form Gaussian kernel and applies no corruption operator; "
                "use noise: gaussian"
            )
        schedule = components.get("schedule")
        if schedule is not None and schedule.build_module() is not None:
            problems.append(
                "chain 'cld' trains with its own HSM objective, which does not train a learned schedule; "
                "use a fixed schedule (e.g. cosine)"
            )
        return problems

    # ---------------------------------------------------------------- noise levels

    @property
    def damping(self) -> float:
        """Gamma = 2 sqrt(M), critical damping."""
        return 2.0 * math.sqrt(self.mass)

    @property
    def horizon_time(self) -> float:
        """B_T = beta T, the integrated time of the prior."""
        return self.beta * self.horizon

    def time(self, logsnr: float) -> float:
        """The integrated time B of a logSNR (host float)."""
        if logsnr == math.inf:
            return 0.0
        if logsnr == -math.inf:
            return math.inf
        return _host_time(float(logsnr), self.mass, self.gamma)

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = kernel(time_from_logsnr(logsnr, self.mass, self.gamma), self.mass, self.gamma)
        return k.mean_x, k.xx.sqrt()

    def level(self, logsnr: float) -> Level:
        logsnr = float(logsnr)
        if logsnr == math.inf:
            return Level(logsnr=logsnr, alpha=1.0, sigma=0.0)
        if logsnr == -math.inf:
            return Level(logsnr=logsnr, alpha=0.0, sigma=1.0)
        k = _host_kernel(self.time(logsnr), self.mass, self.gamma)[0]
        return Level(logsnr=logsnr, alpha=k.mean_x, sigma=math.sqrt(k.xx))

    def level_at_time(self, b: float) -> Level:
        """The level at integrated time B (no inversion: for a sampler's inner points)."""
        if b <= 0.0:
            return self.level(math.inf)
        k = _host_kernel(float(b), self.mass, self.gamma)[0]
        return Level(logsnr=_host_logsnr(float(b), self.mass, self.gamma), alpha=k.mean_x, sigma=math.sqrt(k.xx), chain=self)

    def sampling_levels(self, levels: list[Level], schedule: Schedule) -> list[Level]:
        """Start at the horizon B_T (where the prior holds) and keep the grid's less noisy levels."""
        start = self.level_at_time(self.horizon_time)
        return [start] + [level for level in levels if level.logsnr > start.logsnr]

    def describe_sampling(self, before: list[Level], after: list[Level]) -> str | None:
        dropped = sum(1 for level in before if level.logsnr <= after[0].logsnr)
        return f"cld: sampling starts from the prior at the horizon B_T = {self.horizon_time:g} (logSNR {after[0].logsnr:.4g}); {dropped} noisier grid levels dropped"

    def training_logsnr(self, logsnr: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Draws noisier than the horizon are moved to it: sampling never visits them."""
        return logsnr.clamp(min=_host_logsnr(self.horizon_time, self.mass, self.gamma))

    def forward_sde(self, level: Level) -> tuple[float, float]:
        """Not a scalar linear SDE in lambda: the coupled (x, v) dynamics are the module
        docstring's, and ``reverse_linear_step`` / ``score_step`` integrate their reverse."""
        raise FundiffError(
            "chain 'cld' is a coupled (x, v) system: its SDE is not the scalar dx = f x dtau + g dW of a Gaussian "
            "chain (forward_sde, reverse_sde, pf_ode); use its reverse_linear_step and score_step, as cld-sscs does"
        )

    # ---------------------------------------------------------------- state

    def state_spec(self, spec: DataSpec) -> DataSpec:
        return attrs.evolve(spec, shape=(2 * spec.shape[0], *spec.shape[1:]))

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """(x0, 0): v0's mean; its spread N(0, gamma M) is part of the perturbation kernel."""
        return torch.cat([x0, torch.zeros_like(x0)], dim=1)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        return _split(state)[0]

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """N(0, diag(1, M)), the equilibrium of the forward SDE."""
        noise_x, noise_v = _split(noise)
        return torch.cat([noise_x, math.sqrt(self.mass) * noise_v], dim=1)

    def _perturb_at(self, x0: torch.Tensor, noise: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """u_B = mean + L eps for per-sample times ``b`` (B,)."""
        k = kernel(b, self.mass, self.gamma)
        l_xx, l_xv, l_vv = cholesky(k)
        noise_x, noise_v = _split(noise)
        x = _per_sample(k.mean_x, x0) * x0 + _per_sample(l_xx, x0) * noise_x
        v = _per_sample(k.mean_v, x0) * x0 + _per_sample(l_xv, x0) * noise_x + _per_sample(l_vv, x0) * noise_v
        return torch.cat([x, v], dim=1)

    def perturb(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The HSM kernel at the level of (alpha, sigma): ``x0`` is an encoded state (its
        velocity half is ignored: v0 is drawn inside the kernel), ``noise`` standard normal
        of the state's shape."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        lam = 2.0 * (torch.log(alpha) - torch.log(sigma))
        b = time_from_logsnr(lam, self.mass, self.gamma).expand(x0.shape[0])
        return self._perturb_at(_split(x0)[0], noise, b)

    # ---------------------------------------------------------------- training

    def _mixed_term(self, v: torch.Tensor, k: Kernel, l_vv: torch.Tensor) -> torch.Tensor:
        """v / (ell Sigma_vv) = v L_vv / Sigma_vv: eps_v of the velocity score -v / Sigma_vv."""
        return v * _per_sample(l_vv / k.vv, v)

    def training_losses(self, batch):
        """Hybrid score matching with the paper's ell_t^{-2} weighting: the mean
        squared error of the velocity noise, per example. The recipe's weighting supplies the
        training density of lambda; its loss weight is not applied (HSM fixes it)."""
        x0 = _split(batch.x0)[0]
        b = time_from_logsnr(batch.logsnr, self.mass, self.gamma)
        k = kernel(b, self.mass, self.gamma)
        _, _, l_vv = cholesky(k)
        noise = batch.noise.sample(0)
        u = self._perturb_at(x0, noise, b)
        out = batch.network(u, batch.logsnr.to(u.device, u.dtype), batch.cond).to(u.dtype)
        out_x, out_v = _split(out)
        noise_x, noise_v = _split(noise)
        target_v = noise_v - self._mixed_term(_split(u)[1], k, l_vv) if self.mixed_score else noise_v
        losses = ((out_v - target_v) ** 2).flatten(1).mean(1)
        if self.position_weight > 0:
            losses = losses + self.position_weight * ((out_x - noise_x) ** 2).flatten(1).mean(1)
        return losses

    # ---------------------------------------------------------------- what samplers use

    def host_kernel(self, level: Level) -> tuple[Kernel, float, float, float]:
        """The kernel at a noisy level as host floats, with its Cholesky factor (L_xx, L_xv, L_vv)."""
        return _host_kernel(self.time(level.logsnr), self.mass, self.gamma)

    def velocity_noise(self, state: torch.Tensor, denoised: torch.Tensor, level: Level) -> torch.Tensor:
        """eps_v_hat from a sampler's ``denoise`` output at ``level`` (the eps
        parameterization's (u - sigma out) / alpha): out_v = (v - alpha d_v) / sigma, plus the
        mixed-score term v L_vv / Sigma_vv."""
        v, d_v = _split(state)[1], _split(denoised)[1]
        out_v = (v - level.alpha * d_v) / level.sigma
        if not self.mixed_score:
            return out_v
        k, _, _, l_vv = self.host_kernel(level)
        return out_v + (l_vv / k.vv) * v

    def velocity_score(self, state: torch.Tensor, denoised: torch.Tensor, level: Level) -> torch.Tensor:
        """grad_v log p_B(u) = -ell eps_v_hat = -eps_v_hat / L_vv."""
        l_vv = self.host_kernel(level)[3]
        return self.velocity_noise(state, denoised, level) * (-1.0 / l_vv)

    def denoised_for(self, state: torch.Tensor, x0_hat: torch.Tensor, level: Level) -> torch.Tensor:
        """What ``denoise`` returns for an ideal network whose data estimate is ``x0_hat``
        (the inverse of :meth:`velocity_noise`): eps = L^{-1}(u - mean(x0_hat)) through the eps
        parameterization. For oracles and tests: an exact E[x0 | u] gives the exact score,
        since the kernel's mean is linear in x0."""
        k, l_xx, l_xv, l_vv = self.host_kernel(level)
        x, v = _split(state)
        eps_x = (x - k.mean_x * x0_hat) / l_xx
        eps_v = (v - k.mean_v * x0_hat - l_xv * eps_x) / l_vv
        if self.mixed_score:
            eps_v = eps_v - (l_vv / k.vv) * v
        out = torch.cat([eps_x, eps_v], dim=1)
        return (state - level.sigma * out) / level.alpha

    def reverse_linear_step(self, state: torch.Tensor, h: float, noise: torch.Tensor) -> torch.Tensor:
        """The exact solution over reverse time h of the linear part of the reverse SDE,
        du = [[0, -1/M], [1, -Gamma/M]] u dB + (0, sqrt(2 Gamma)) dW (an Ornstein-Uhlenbeck
        process whose drift matrix has the double eigenvalue -c): mean
        e^{-ch} [[1 + ch, -h/M], [h, 1 - ch]] u and covariance S(h) with S_xv negated (the
        forward noise covariance of the mirrored system); ``noise`` standard normal."""
        c = 1.0 / math.sqrt(self.mass)
        decay = math.exp(-c * h)
        x, v = _split(state)
        s_xx, s_xv, s_vv = (float(t) for t in _noise_covariance(torch.tensor(h, dtype=torch.float64), self.mass))
        det = s_xx * s_vv - s_xv * s_xv
        l_xx = math.sqrt(s_xx)
        l_xv = -s_xv / l_xx if l_xx > 0 else 0.0
        l_vv = math.sqrt(max(det, 0.0) / s_xx) if s_xx > 0 else 0.0
        noise_x, noise_v = _split(noise)
        new_x = decay * ((1.0 + c * h) * x - (h / self.mass) * v) + l_xx * noise_x
        new_v = decay * (h * x + (1.0 - c * h) * v) + l_xv * noise_x + l_vv * noise_v
        return torch.cat([new_x, new_v], dim=1)

    def score_step(self, state: torch.Tensor, velocity_score: torch.Tensor, h: float) -> torch.Tensor:
        """Euler step over reverse time h of the score part, dv = 2 Gamma (score_v + v / M) dB
        (zero at equilibrium, where score_v = -v / M)."""
        x, v = _split(state)
        return torch.cat([x, v + (2.0 * self.damping * h) * (velocity_score + v / self.mass)], dim=1)


@hookimpl
def fundiff_register_chains(register):
    register("cld", CriticallyDampedLangevin)
