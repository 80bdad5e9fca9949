"""Shared math of the categorical chains (D3PM: Austin et al. 2021, "Structured Denoising
Diffusion Models in Discrete State-Spaces"; survey sec. 3.2.3, transitions redesigned for
discrete data).

State. An example is one-hot over M state classes along its first axis (axis 1 of a batch),
shape (M, *positions); every position is its own categorical variable. The data are one-hot
over K classes (shape (K, *positions)); a chain may add classes of its own (the absorbing
chain's [MASK]), so M = K + extra.

Transition matrices. Both built-in chains have one-step and cumulative matrices of the form

    Q(a) = a I + (1 - a) 1 pi^T          (row i: the distribution of the next state from class i)

with ``pi`` the chain's stationary distribution (uniform: 1/K on every class; absorbing: all
mass on [MASK]). Since 1 pi^T is idempotent (pi^T 1 = 1), Q(a) Q(b) = Q(a b): the matrices
compose by multiplying their keep probabilities, exactly like alpha_{t|s} = alpha_t / alpha_s
of a Gaussian chain.

The noise-level currency. The keep probability of the cumulative matrix Q-bar_t = Q(alpha_bar_t)
is tied to the logSNR by alpha_bar = sigmoid(lambda), the same map as alpha^2 on a VP chain
(so the cosine schedule gives D3PM's cosine alpha_bar, and ``simple-linear`` gives the
absorbing chain's alpha_bar = 1 - t of the paper). A :class:`fundiff.Level` stores

    Level.alpha = alpha_bar = sigmoid(lambda),    Level.sigma = 1 - alpha_bar = sigmoid(-lambda),

so the clean level lambda = +inf has sigma = 0 and the terminal lambda = -inf has alpha = 0;
sigma is computed as sigmoid(-lambda) rather than 1 - alpha, which keeps its relative
accuracy when alpha_bar is close to 1. Between two levels s (less noisy) and t the step matrix
is Q_{t|s} = Q(alpha_bar_t / alpha_bar_s), and 1 - alpha_bar_t / alpha_bar_s is evaluated as
-expm1(logsigmoid(lambda_t) - logsigmoid(lambda_s)) for the same reason.

Posteriors (D3PM eq. 3 and eq. 4). For x_t one-hot,

    q(x_s | x_t, x0) = (x_t Q_{t|s}^T) * (x0 Q-bar_s) / (x0 Q-bar_t x_t^T),

the product of the likelihood of x_t under each value of x_s and the marginal of x_s given
x0. The model's reverse step replaces the one-hot x0 in the second factor by the network's
predicted class probabilities p(x0 | x_t) and normalises (eq. 4: proportional to
sum_x0 q(x_s, x_t | x0) p(x0 | x_t)); ``posterior`` implements both, since eq. 4 is eq. 3
with a distribution in place of a one-hot vector.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import attrs
import torch

from fundiff import Chain, DataSpec, FundiffError, Level, LevelTensors, TrainingBatch
from fundiff.components import CATEGORICAL_STATE, CORRUPTION_OPERATOR, GAUSSIAN_NOISE
from fundiff.config import at_least, doc

#: data modalities whose examples are one-hot over classes on their first axis (``DataSpec.modality``)
ONE_HOT_MODALITIES = ("one-hot", "one-hot-images")
#: a level as host floats (``Level``) or per-sample tensors of shape (B,) (``LevelTensors``)
AnyLevel = Level | LevelTensors


def logsigmoid(x: float) -> float:
    """log(sigmoid(x)) on a host float without overflow: -log1p(exp(-x)) for x >= 0."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    """The logistic function on a host float without overflow (exact 0 and 1 at -inf, +inf)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def one_hot_like(index: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot over axis 1 from class indices of shape (B, *positions), in ``like``'s dtype."""
    hot = torch.nn.functional.one_hot(index, num_classes)  # (B, *positions, M)
    return hot.movedim(-1, 1).to(like.dtype)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A one-hot draw per position from ``probs`` (B, M, *positions; normalised along axis 1)
    by inverting the cumulative distribution at the uniforms ``u`` (B, 1, *positions) or
    (B, M, *positions), of which channel 0 is used: the class is the number of cumulative
    probabilities below u. Scaling u by the total keeps the draw inside the support when the
    probabilities do not sum to exactly 1 after rounding."""
    u = u[:, :1].to(probs.dtype)
    cumulative = probs.cumsum(1)
    index = (cumulative < u * cumulative[:, -1:]).sum(1).clamp(max=probs.shape[1] - 1)
    return one_hot_like(index, probs.shape[1], probs)


def _is_host(level: AnyLevel) -> bool:
    return isinstance(level, Level)


@attrs.frozen(kw_only=True)
class CategoricalChain(Chain):
    """Base of the D3PM chains: Q(a) = a I + (1 - a) 1 pi^T on one-hot states (module docstring)."""

    provides = frozenset({CATEGORICAL_STATE})
    #: the name the chain is registered under (for messages)
    name: ClassVar[str] = ""
    #: classes the chain adds to the data's K (the absorbing chain's [MASK]: 1)
    extra_classes: ClassVar[int] = 0

    num_steps: int = attrs.field(
        default=100,
        validator=at_least(1),
        metadata=doc(
            "T, the steps of the discrete chain, at the schedule's t = k / T: training moves each drawn level to the "
            "step k of its cell of [t_min, 1] and learns the step from k - 1 to k; sampling visits grid levels only"
        ),
    )
    hybrid_coeff: float = attrs.field(
        default=0.01,
        validator=at_least(0.0),
        metadata=doc(
            "lambda of D3PM's hybrid loss L_vb + lambda CE (eq. 5): the weight of the auxiliary cross-entropy of the "
            "predicted x0; 0 trains on the variational bound alone"
        ),
    )

    # ------------------------------------------------------------ the chain's own math

    @abc.abstractmethod
    def stationary(self, num_state_classes: int, like: torch.Tensor) -> torch.Tensor:
        """pi, the distribution Q(a) moves mass to: shape (1, M, 1, ..., 1) to broadcast
        against a batch like ``like``, in its dtype and device."""

    def data_classes(self, num_state_classes: int) -> int:
        """K, the number of state classes that are data classes (the first K channels)."""
        return num_state_classes - self.extra_classes

    def marginal(self, x0: torch.Tensor, level: AnyLevel) -> torch.Tensor:
        """q(x_t | x0) = x0 Q-bar_t = alpha_bar x0 + (1 - alpha_bar) pi (D3PM eq. 2 for this
        family); ``x0`` one-hot or a distribution over the state classes, (B, M, *positions)."""
        alpha, sigma = self._broadcast(level.alpha, x0), self._broadcast(level.sigma, x0)
        return alpha * x0 + sigma * self.stationary(x0.shape[1], x0)

    def transition_matrix(self, keep: float, num_state_classes: int) -> torch.Tensor:
        """Q(a) = a I + (1 - a) 1 pi^T as an (M, M) float64 matrix; row i is the distribution
        of the next state from class i. ``keep`` is alpha_bar for the cumulative matrix and
        alpha_bar_t / alpha_bar_s for the step from s to t."""
        identity = torch.eye(num_state_classes, dtype=torch.float64)
        pi = self.stationary(num_state_classes, identity[:1]).reshape(1, num_state_classes)
        return keep * identity + (1.0 - keep) * torch.ones(num_state_classes, 1, dtype=torch.float64) @ pi

    def step_keep(self, s: AnyLevel, t: AnyLevel) -> tuple[Any, Any]:
        """(a, 1 - a) of the step matrix Q_{t|s} = Q(a), a = alpha_bar_t / alpha_bar_s, for s
        less noisy than t; 1 - a = -expm1(logsigmoid(lambda_t) - logsigmoid(lambda_s)) keeps
        its relative accuracy when both levels are nearly clean. Where alpha_bar_s = 0 the
        state is already stationary and the step keeps it (a = 1)."""
        if _is_host(s):
            if s.alpha == 0.0:
                return 1.0, 0.0
            one_minus = -math.expm1(logsigmoid(t.logsnr) - logsigmoid(s.logsnr))
            return 1.0 - one_minus, one_minus
        log_ratio = torch.nn.functional.logsigmoid(t.logsnr) - torch.nn.functional.logsigmoid(s.logsnr)
        stationary = s.alpha == 0
        one_minus = torch.where(stationary, torch.zeros_like(log_ratio), -torch.expm1(torch.where(stationary, 0.0, log_ratio)))
        return 1.0 - one_minus, one_minus

    def likelihood(self, x_t: torch.Tensor, keep: Any, leave: Any) -> torch.Tensor:
        """q(x_t | x_s = i) for every class i: the column of Q(keep) that x_t picks,
        keep x_t + leave (x_t . pi), shaped like x_t (``leave`` = 1 - keep)."""
        pi = self.stationary(x_t.shape[1], x_t)
        keep, leave = self._broadcast(keep, x_t), self._broadcast(leave, x_t)
        return keep * x_t + leave * (x_t * pi).sum(1, keepdim=True)

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, s: AnyLevel, t: AnyLevel) -> torch.Tensor:
        """Probabilities of x_s given x_t for s less noisy than t, shape like ``x_t``.

        With ``x0`` one-hot this is q(x_s | x_t, x0) (D3PM eq. 3); with ``x0`` the model's
        predicted distribution p(x0 | x_t) it is the reverse step p(x_s | x_t) of eq. 4,
        proportional to (x_t Q_{t|s}^T) * (p Q-bar_s). ``s`` and ``t``: host levels or
        per-sample :class:`fundiff.LevelTensors`.
        """
        keep, leave = self.step_keep(s, t)
        unnormalised = self.likelihood(x_t, keep, leave) * self.marginal(x0, s)
        total = unnormalised.sum(1, keepdim=True)
        return unnormalised / total.clamp_min(torch.finfo(total.dtype).tiny)

    def x0_distribution(self, probs: torch.Tensor) -> torch.Tensor:
        """The model's x0 prediction as a distribution over data classes: negative entries
        (possible after guidance mixes predictions) are clipped, the chain's own classes
        ([MASK]) get no mass, and each position is normalised."""
        probs = probs.clamp_min(0.0)
        k = self.data_classes(probs.shape[1])
        if k < probs.shape[1]:
            probs = torch.cat([probs[:, :k], torch.zeros_like(probs[:, k:])], dim=1)
        total = probs.sum(1, keepdim=True)
        return probs / total.clamp_min(torch.finfo(total.dtype).tiny)

    @staticmethod
    def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One-hot draws from ``probs`` at the uniforms ``u`` (see :func:`sample_categorical`)."""
        return sample_categorical(probs, u)

    @staticmethod
    def _broadcast(value: Any, like: torch.Tensor) -> Any:
        """A per-sample (B,) tensor reshaped to broadcast against ``like``; floats unchanged."""
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            return value.to(like.device, like.dtype).reshape(value.shape + (1,) * (like.ndim - 1))
        return value

    # ------------------------------------------------------------ the chain interface

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # alpha_bar = sigmoid(lambda) and 1 - alpha_bar = sigmoid(-lambda) (module docstring)
        return torch.sigmoid(logsnr), torch.sigmoid(-logsnr)

    def level(self, logsnr: float) -> Level:
        logsnr = float(logsnr)
        return Level(logsnr=logsnr, alpha=sigmoid(logsnr), sigma=sigmoid(-logsnr))

    def perturb(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x0) = alpha x0 + sigma pi (alpha = alpha_bar, sigma =
        1 - alpha_bar) from standard normal ``noise`` shaped like the state: channel 0's
        normal at each position becomes a uniform through the normal CDF Phi."""
        probs = alpha * x0 + sigma * self.stationary(x0.shape[1], x0)
        return sample_categorical(probs, _normal_cdf(noise))

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """The terminal distribution pi (q(x_T | x0) for alpha_bar_T = 0), drawn from standard
        normal ``noise`` as in ``perturb``."""
        pi = self.stationary(noise.shape[1], noise).expand_as(noise)
        return sample_categorical(pi, _normal_cdf(noise))

    def initial_state(self, level: Level, source: Any) -> torch.Tensor:
        """A draw from pi per position with the sample's own uniforms (``source.uniform(0)``)."""
        u = source.uniform(0)
        return sample_categorical(self.stationary(u.shape[1], u).expand_as(u), u)

    def state_spec(self, spec: DataSpec) -> DataSpec:
        return DataSpec(
            shape=(spec.shape[0] + self.extra_classes, *spec.shape[1:]), num_classes=spec.num_classes, modality=spec.modality
        )

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """One-hot data (B, K, ...) to the state (B, K + extra, ...): the chain's own classes
        are empty in clean data."""
        if not self.extra_classes:
            return x0
        extra = x0.new_zeros((x0.shape[0], self.extra_classes, *x0.shape[2:]))
        return torch.cat([x0, extra], dim=1)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """The state (one-hot, or class probabilities) to one-hot data over the K data
        classes: the most probable data class at each position (a [MASK] left in a state
        that did not reach the clean level is replaced by it)."""
        k = self.data_classes(state.shape[1])
        return one_hot_like(state[:, :k].argmax(1), k, state)

    def fit(self, pipeline: Any) -> None:
        """Check once per run that the data are one-hot along axis 0 of an example (the
        chain's state is built from them; anything else would train on nonsense)."""
        x = pipeline.data.x
        values_ok = bool(((x == 0) | (x == 1)).all())
        if not values_ok or not bool((x.sum(1) == 1).all()):
            raise FundiffError(
                f"chain '{self.name}' needs one-hot data (values 0 or 1 along axis 0 of an example, one 1 per "
                f"position), but the data set's examples of shape {tuple(x.shape[1:])} are not; use data: "
                "binary-digits, or a tensor-file of one-hot arrays"
            )

    def check_recipe(self, components: dict) -> list[str]:
        problems = []
        data = components.get("data")
        if data is not None:
            spec = data.spec()
            shape = tuple(spec.shape)
            if spec.modality not in ONE_HOT_MODALITIES or len(shape) < 1 or shape[0] < 2:
                problems.append(
                    f"chain '{self.name}' needs one-hot data (modality {' or '.join(ONE_HOT_MODALITIES)}, K >= 2 classes "
                    f"on axis 0 of an example), but the data set gives modality '{spec.modality}' and shape {shape}; use "
                    "data: binary-digits, or a tensor-file of one-hot arrays with modality: one-hot"
                )
        for kind, fix in (("parameterization", "parameterization: logits"), ("sampler", "sampler: d3pm-ancestral")):
            component = components.get(kind)
            if component is not None and CATEGORICAL_STATE not in type(component).requires:
                problems.append(
                    f"chain '{self.name}' has a categorical state, but the {kind} {type(component).__name__} is made for "
                    f"Gaussian states (it does not require '{CATEGORICAL_STATE}'); use {fix}"
                )
        noise = components.get("noise")
        if noise is not None and (GAUSSIAN_NOISE not in type(noise).provides or CORRUPTION_OPERATOR in type(noise).provides):
            problems.append(
                f"chain '{self.name}' draws its categorical perturbations from standard normal noise (through the "
                f"normal CDF), but the noise type {type(noise).__name__} is not plain Gaussian noise; use noise: gaussian"
            )
        schedule = components.get("schedule")
        if schedule is not None and 1.0 / self.num_steps < float(schedule.t_min):
            problems.append(
                f"chain '{self.name}' has num_steps {self.num_steps}: its first grid level t = 1/{self.num_steps} is below "
                f"the schedule's t_min = {float(schedule.t_min):g}; use num_steps <= {math.floor(1.0 / float(schedule.t_min))}"
            )
        steps = getattr(components.get("sampler"), "steps", None)
        if isinstance(steps, int) and steps > self.num_steps:
            problems.append(
                f"chain '{self.name}' has {self.num_steps} steps but sampler.steps is {steps}: the sampler can visit at "
                f"most the chain's {self.num_steps} grid levels; set sampler.steps <= {self.num_steps}"
            )
        return problems

    # ------------------------------------------------------------ training

    def grid_step(self, logsnr: torch.Tensor, schedule: Any) -> torch.Tensor:
        """The grid step k in 1 .. T of each logSNR (float64 on the CPU): t = t(lambda) of the
        schedule, with [t_min, 1] cut into T equal cells and cell k holding ((k - 1) / T, k / T]
        of it. Under ``uniform-t`` (t uniform on [t_min, 1]) every k has probability 1 / T, as
        in D3PM's discrete time. Grid levels t = k / T land in their own cell k (the cell edge
        lies at or below k / T for t_min T <= 1), so snapping is idempotent; a margin of 1e-9
        cells absorbs the rounding of t(lambda(k / T))."""
        with torch.no_grad():
            t = schedule.t_from_logsnr(logsnr.detach().to("cpu", torch.float64)).to(torch.float64)
            t_min = float(schedule.t_min)
            cell = (t - t_min) / (1.0 - t_min) * self.num_steps
            return torch.ceil(cell - 1e-9).clamp(1, self.num_steps)

    def grid_levels(self, logsnr: torch.Tensor, schedule: Any) -> tuple[LevelTensors, LevelTensors, torch.Tensor]:
        """Snap training logSNRs to the chain's grid: the levels (s, t) at the schedule's
        t = (k - 1) / T and k / T of their step k (``grid_step``), as float64 tensors on the
        CPU, and k. Step 0 is the data itself (alpha_bar = 1, lambda = +inf) whatever the
        schedule's lambda(0)."""
        steps = self.num_steps
        k = self.grid_step(logsnr, schedule)
        with torch.no_grad():
            lam_t = schedule.logsnr(k / steps).detach().to(torch.float64)
            lam_s = torch.where(k > 1, schedule.logsnr((k - 1).clamp(min=1) / steps).detach().to(torch.float64), math.inf)
        # at the noisiest end lambda_t may be -inf; the levels keep that (alpha_bar = 0)
        return self._tensor_level(lam_s), self._tensor_level(lam_t), k.long()

    def training_logsnr(self, logsnr: torch.Tensor, schedule: Any) -> torch.Tensor:
        """The weighting's draws moved to the chain's grid levels lambda(k / T) (``grid_step``)."""
        return self.grid_levels(logsnr, schedule)[1].logsnr.to(logsnr.device)

    def sampling_levels(self, levels: list[Level], schedule: Any) -> list[Level]:
        """Every noisy level of the sampler's grid moved to the nearest grid level k / T of the
        chain (repeats dropped), so the network is only evaluated at levels it was trained on;
        the reverse step between any two grid levels is exact, so skipping some is fine. The
        clean level stays."""
        noisy = [level for level in levels if not level.is_clean]
        if not noisy:
            return levels
        t = schedule.t_from_logsnr(torch.tensor([level.logsnr for level in noisy], dtype=torch.float64))
        steps = torch.round(t.to(torch.float64) * self.num_steps).clamp(1, self.num_steps)
        kept: list[float] = []
        for k in steps.tolist():
            if not kept or k < kept[-1]:
                kept.append(k)
        grid = schedule.logsnr(torch.tensor(kept, dtype=torch.float64) / self.num_steps).tolist()
        return [self.level(value) for value in grid] + [level for level in levels if level.is_clean]

    def _tensor_level(self, logsnr: torch.Tensor) -> LevelTensors:
        alpha, sigma = self.alpha_sigma(logsnr)
        return LevelTensors(logsnr=logsnr, alpha=alpha, sigma=sigma)

    def training_losses(self, batch: TrainingBatch) -> torch.Tensor:
        """D3PM's hybrid loss (eq. 5) per example: L_vb + hybrid_coeff * CE, in nats per position.

        * a grid step k is drawn through the recipe's weighting (only its density over
          levels is used; its loss weight w(lambda) does not apply: the objective is D3PM's)
          and x_t ~ q(x_t | x0) with the batch's uniforms (draw 0);
        * L_vb term: KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) with p from eq. 4; at k = 1
          the target q(x_0 | x_1, x0) is x0 itself, so the KL is the decoder's -log p(x0 | x_1)
          (D3PM's L_0) by the same formula. The prior term KL(q(x_T | x0) || pi) has no
          parameters and is left out. As in the paper, one uniformly drawn term is used
          without the factor T that would make it an unbiased estimate of the whole bound;
          that is the scale at which lambda = 0.01 weighs the cross-entropy.
        * CE: -log p(x0 | x_k) of the network's predicted x0 distribution (the auxiliary term).

        The loss arithmetic runs in float64 (the network itself in its own precision).
        """
        schedule, param = batch.components["schedule"], batch.components["parameterization"]
        x0 = batch.x0
        s, t, _ = self.grid_levels(batch.logsnr, schedule)
        device = x0.device
        s = LevelTensors(*(v.to(device) for v in (s.logsnr, s.alpha, s.sigma)))
        t = LevelTensors(*(v.to(device) for v in (t.logsnr, t.alpha, t.sigma)))
        x_t = sample_categorical(self.marginal(x0, t), batch.noise.uniform(0))
        a, sg = self._broadcast(t.alpha, x0), self._broadcast(t.sigma, x0)
        x_in = x_t * param.input_scale(a, sg)
        out = batch.network(x_in, t.logsnr.to(x0.dtype), batch.cond)
        x0_64, x_t64 = x0.to(torch.float64), x_t.to(torch.float64)
        predicted = self.x0_distribution(param.to_x0(out.to(torch.float64), x_t64, a.to(torch.float64), sg.to(torch.float64)))
        target = self.posterior(x_t64, x0_64, s, t)
        model = self.posterior(x_t64, predicted, s, t)
        tiny = torch.finfo(torch.float64).tiny
        # KL(q || p) = sum_i q_i (log q_i - log p_i), with 0 log 0 = 0
        kl = (torch.xlogy(target, target) - torch.xlogy(target, model.clamp_min(tiny))).sum(1)
        ce = -torch.xlogy(x0_64, predicted.clamp_min(tiny)).sum(1)
        per_position = kl + self.hybrid_coeff * ce
        return per_position.flatten(1).mean(1).to(x0.dtype)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) = erfc(-z / sqrt(2)) / 2 (erfc keeps the lower tail accurate)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0))
