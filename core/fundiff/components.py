"""The component kinds: one abstract base class per kind of design in the survey.

A component is a frozen attrs class whose fields are its recipe parameters. The recipe
section ``schedule: {name: cosine, offset: 0.008}`` is structured into ``Cosine(offset=0.008)``
after the registry resolves ``cosine``; ``fundiff show schedule/cosine`` lists the same
fields. Write a component like this::

    import attrs, torch
    from fundiff import Schedule, hookimpl

    @attrs.frozen(kw_only=True)
    class Quadratic(Schedule):
        '''logSNR falling quadratically from `start` to `end`.'''
        start: float = attrs.field(default=10.0, metadata={"doc": "logSNR at t = 0"})
        end: float = attrs.field(default=-10.0, metadata={"doc": "logSNR at t = 1"})

        def logsnr(self, t):
            return self.start + (self.end - self.start) * t * (2 - t)
        ...

    @hookimpl
    def fundiff_register_schedules(register):
        register("quadratic", Quadratic)

Components also declare capabilities: ``provides`` (what they bring to a recipe, e.g.
``"gaussian-marginals"``) and ``requires`` (what must be provided by some other component
of the same recipe). A recipe whose requirements are not met is refused at load time, with
a message naming the component, the requirement and the registered components that provide
it.

The training and sampling loops call these plain objects; hooks only register them.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol, Sequence

import attrs
import torch

from .noiselevel import Level

if TYPE_CHECKING:
    from .fused import Prediction
    from .rng import NoiseStream

#: Capability names used by the built-in components. Third-party ones may add their own.
GAUSSIAN_MARGINALS = "gaussian-marginals"  # chain: x_t = alpha x0 + sigma eps
GAUSSIAN_NOISE = "gaussian-noise"  # noise: eps ~ N(0, I)
ADDITIVE_NOISE = "additive-noise"  # noise: zero-mean noise added to the signal, any distribution
CORRUPTION_OPERATOR = "corruption-operator"  # noise: a (soft) linear operator degrades x0
CATEGORICAL_STATE = "categorical-state"  # chain: the state is one-hot over classes (axis 1 of a batch)
MANIFOLD_STATE = "manifold-state"  # chain: the state lies on a manifold (Level.chain has its maps)


class Component(metaclass=abc.ABCMeta):
    """Base of every component. Subclasses are frozen attrs classes (their parameters)."""

    kind: ClassVar[str] = ""
    #: capabilities this component brings to a recipe
    provides: ClassVar[frozenset[str]] = frozenset()
    #: capabilities some other component of the recipe must provide
    requires: ClassVar[frozenset[str]] = frozenset()

    def check_recipe(self, components: "dict[str, Component]") -> list[str]:
        """Return problems with the other components of a recipe beyond requires/provides.

        Called once when a recipe is loaded; ``components`` maps kind to instance. The
        default finds nothing. Each problem is one sentence naming the cause and the fix.
        """
        return []


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DataSpec:
    """What the rest of a recipe needs to know about a data set."""

    shape: tuple[int, ...]  # shape of one example
    num_classes: int = 0  # 0: unlabelled
    # "points" (scatter plots), "images" (C, H, W grids), or one-hot over classes on axis 0 of
    # an example: "one-hot" (no picture) and "one-hot-images" (K, H, W; pictures show the class index)
    modality: str = "points"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@attrs.frozen(kw_only=True)
class Data:
    """A data set in memory: ``x`` is (N, *shape) float32, ``labels`` (N,) int64 or None."""

    x: torch.Tensor
    spec: DataSpec
    labels: Optional[torch.Tensor] = None


class DataSet(Component):
    """A data set (registered through ``fundiff_register_data``).

    ``load()`` returns a :class:`Data`, deterministic for given parameters, from data the
    package ships or generates (no downloads). ``spec()`` returns its :class:`DataSpec`
    without loading, so models can be built and recipes checked cheaply.
    """

    kind = "data"

    @abc.abstractmethod
    def spec(self) -> DataSpec: ...

    @abc.abstractmethod
    def load(self) -> Data: ...


# --------------------------------------------------------------------------------------
# Forward process: schedule, noise, chain
# --------------------------------------------------------------------------------------


class Schedule(Component):
    """A noise schedule: a strictly decreasing map from t in [0, 1] to logSNR lambda(t).

    ``logsnr`` and ``t_from_logsnr`` take and return tensors (float64 in, float64 out).
    ``t_min`` is the smallest t at which a model is evaluated (> 0 when lambda(0) = +inf).
    Discrete schedules (a T-step chain) subclass :class:`DiscreteSchedule`.
    """

    kind = "schedule"

    @abc.abstractmethod
    def logsnr(self, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor: ...

    @property
    def t_min(self) -> float:
        return 0.0

    def logsnr_at(self, t: float) -> float:
        """lambda(t) on the host as a Python float (used for sampler grids)."""
        return float(self.logsnr(torch.tensor(t, dtype=torch.float64)))

    def reaches_zero_snr(self) -> bool:
        """True when lambda(1) = -inf: alpha = 0 at the terminal level (zero terminal SNR,
        Lin et al. 2024), which components that divide by alpha refuse in ``check_recipe``."""
        return self.logsnr_at(1.0) == -math.inf

    def logsnr_and_rate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda(t), d lambda / dt), by automatic differentiation of ``logsnr``.

        The rate stays differentiable with respect to a learned schedule's parameters
        (``create_graph``), so losses weighted by it can train them."""
        with torch.enable_grad():
            t = t.detach().clone().requires_grad_(True)
            logsnr = self.logsnr(t)
            (rate,) = torch.autograd.grad(logsnr.sum(), t, create_graph=True)
        return logsnr, rate

    def build_module(self) -> "Optional[torch.nn.Module]":
        """A schedule with trainable parameters returns a ``torch.nn.Module`` here that
        itself implements ``logsnr``, ``t_from_logsnr`` and ``t_min``; the pipeline then uses
        the module as the schedule, trains its parameters with the denoiser's optimizer (to
        minimise the variance of the loss estimate, as in VDM, Kingma et al. 2021, sec. 5.2,
        since the expected variational loss does not depend on the schedule's interior) and
        stores them in checkpoints. Fixed schedules return None."""
        return None


class DiscreteSchedule(Schedule):
    """A schedule defined by T betas (survey sec. 2.2.1, DDPM's discrete chain).

    Subclasses implement ``betas()``; everything else derives from it, so the betas are
    stored once. alpha_bar_k = prod_{i<=k} (1 - beta_i) sits at t = k / T; between grid
    points log alpha_bar is interpolated linearly in t, which keeps lambda strictly
    decreasing and makes the continuous map agree with the discrete chain at grid points.
    """

    num_steps: int

    @abc.abstractmethod
    def betas(self) -> torch.Tensor:
        """The T betas as a float64 tensor."""

    def log_alpha_bar_grid(self) -> torch.Tensor:
        """log alpha_bar at t = 0, 1/T, ..., 1 (T + 1 values, the first 0)."""
        betas = self.betas().to(torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_1 .. alpha_bar_T, as in the DDPM paper (T values)."""
        return torch.exp(self.log_alpha_bar_grid()[1:])

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_steps

    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        grid = self.log_alpha_bar_grid()
        pos = t.to(torch.float64).clamp(0.0, 1.0) * self.num_steps
        lo = pos.floor().clamp(max=self.num_steps - 1)
        frac = pos - lo
        lo = lo.long()
        return grid[lo] * (1.0 - frac) + grid[lo + 1] * frac

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        log_ab = self._log_alpha_bar(t)
        # lambda = log(ab / (1 - ab)); log(1 - ab) = log(-expm1(log ab)) is exact near ab = 1
        return log_ab - torch.log(-torch.expm1(log_ab))

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        # invert lambda = log(ab / (1 - ab)):  log ab = -softplus(-lambda) = -log(1 + exp(-lambda));
        # logaddexp, not F.softplus, whose threshold (20) drops exp(lambda) below lambda = -20
        log_ab = -torch.logaddexp(-logsnr, torch.zeros((), dtype=torch.float64))
        grid = self.log_alpha_bar_grid()  # decreasing in t
        k = torch.searchsorted(-grid, -log_ab, right=False).clamp(1, self.num_steps)
        left, right = grid[k - 1], grid[k]
        frac = (left - log_ab) / (left - right)
        return ((k - 1).to(torch.float64) + frac) / self.num_steps


class Noise(Component):
    """A noise type: draws the perturbation, zero mean and unit variance per element unless
    the component documents otherwise.

    ``sample(stream, draw)`` returns a tensor of shape ``(batch, *sample_shape)`` from the
    per-sample random stream, so sample i's noise never depends on the batch around it.
    """

    kind = "noise"
    #: set True if the noise type estimates something from the data (see ``bind``)
    needs_data: ClassVar[bool] = False
    #: set True when ``sample(stream, draw)`` is exactly ``stream.normal(draw)``: a fused
    #: sampling step may then draw the noise inside its kernel from the same Philox counters
    standard_normal: ClassVar[bool] = False

    @abc.abstractmethod
    def sample(self, stream: "NoiseStream", draw: int) -> torch.Tensor: ...

    def bind(self, data: "Data") -> "Noise":
        """Return the noise type ready for this data set (e.g. with per-dimension scales
        estimated from it). Called once per pipeline, and only when ``needs_data`` is True;
        must be deterministic so that a run rebuilt for sampling draws the same noise."""
        return self

    def corrupt(self, x0: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Apply the noise type's degradation operator C(lambda) to x0 before the noise is
        added: x_t = alpha C(lambda) x0 + sigma eps. Additive noise types leave x0 as it is;
        soft corruptions (blur, masking) override this and provide ``"corruption-operator"``.
        ``logsnr`` has shape (B,)."""
        return x0


class Chain(Component):
    """A transition chain (survey sec. 3.2): perturbation, prior and reverse-time dynamics.

    Gaussian chains provide ``"gaussian-marginals"``: x_t = alpha x0 + sigma eps, with
    (alpha, sigma) a function of the logSNR lambda that the chain defines. Every such chain
    has one linear SDE with those marginals; ``forward_sde``, ``reverse_sde`` and ``pf_ode``
    give it for any ``alpha_sigma`` (override ``dlog_alpha_dlogsnr`` with a closed form).

    Chains whose state is not additive Gaussian (categorical, manifold, coupled systems,
    latent codes) extend the interface instead of bending it; every extension point below
    has a default that is right for a plain Gaussian chain:

    - ``state_spec(spec)``: the shape the chain and the network work on (default: the data's);
    - ``encode`` / ``decode``: data to state and back (latent chains; default identity);
    - ``build_module``: a chain with fitted or trained state (a data-estimated prior, a
      generator for a truncated chain, an autoencoder) returns a module implementing this
      same interface plus ``fit(pipeline)``; the pipeline uses it as the chain, calls ``fit``
      before training and stores its tensors in checkpoints;
    - ``training_logsnr(logsnr, schedule)``: the levels the chain trains at, from the
      weighting's draws (a discrete-time chain moves them onto its grid; default unchanged);
    - ``training_losses(batch)``: the chain's own objective (None: the Gaussian denoising
      loss of the recipe's parameterization and weighting);
    - ``initial_state(level, source)``: the sampler's starting state from a noise source
      (default ``prior(level, source.sample(0))``);
    - ``sampling_levels(levels, schedule)``: cut or change the sampling grid (a truncated
      chain starts at its truncation level, a discrete-time chain keeps to its grid).
    - ``describe_sampling(before, after)``: a one-line note for the user on what that change
      did (e.g. the steps a truncated chain saves), printed by ``fundiff sample``.

    ``level(logsnr)`` results carry the chain (``Level.chain``), so samplers can reach
    chain-specific maps without seeing the recipe.
    """

    kind = "chain"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("level")
        if method is not None and not getattr(method, "__isabstractmethod__", False) and not getattr(method, "_attaches_chain", False):
            cls.level = _attaching_chain(method)

    @abc.abstractmethod
    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) for a tensor of logSNR values (same shape, dtype, device)."""

    @abc.abstractmethod
    def level(self, logsnr: float) -> Level:
        """A host-side :class:`Level` for one logSNR value (float64 math, no tensors)."""

    def perturb(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t given data, noise and per-sample (alpha, sigma) already shaped to broadcast."""
        return alpha * x0 + sigma * noise

    @abc.abstractmethod
    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's initial state at ``level`` from standard noise."""

    # ---------------------------------------------------------- extension points

    def state_spec(self, spec: DataSpec) -> DataSpec:
        """The spec of the chain's state (what the denoiser sees); default: the data's."""
        return spec

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Data (B, *data shape) to the chain's state at the clean level (default: identity)."""
        return x0

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """The chain's clean state back to data (default: identity)."""
        return state

    def build_module(self, spec: DataSpec) -> "Optional[torch.nn.Module]":
        """A chain with fitted state returns a module here (see the class docstring)."""
        return None

    def fit(self, pipeline: Any) -> None:
        """Fit the chain's own state before the denoiser trains (a module's ``fit``; the
        pipeline calls it once per run, also on resume, so it must skip when already fitted)."""

    def training_losses(self, batch: "TrainingBatch") -> Optional[torch.Tensor]:
        """The (B,) per-example losses of the chain's own objective, or None for the Gaussian
        denoising loss (parameterization target, weighting, reverse variance)."""
        return None

    def initial_state(self, level: Level, source: "PriorSource") -> torch.Tensor:
        """The sampler's initial state at ``level``; ``source.sample(draw)`` gives the recipe's
        noise of the state's shape and ``source.uniform(draw)`` uniforms on (0, 1)."""
        return self.prior(level, source.sample(0))

    def training_logsnr(self, logsnr: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """The (B,) float64 logSNRs a training batch is perturbed to, from the weighting's draws
        ``logsnr`` and the recipe's ``schedule`` (default: unchanged). The weighting's loss
        weight is then evaluated at the returned levels."""
        return logsnr

    def sampling_levels(self, levels: list[Level], schedule: Schedule) -> list[Level]:
        """The grid a sampler walks, from the spacing's grid and the recipe's ``schedule``
        (default: unchanged)."""
        return levels

    def describe_sampling(self, before: list[Level], after: list[Level]) -> Optional[str]:
        """A one-line note on how ``sampling_levels`` turned the spacing's grid ``before`` into
        ``after`` (the steps saved, where sampling starts), for ``fundiff sample`` to print;
        None (the default) when there is nothing to say."""
        return None

    # ---------------------------------------------------------- Gaussian dynamics

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        """d log(alpha) / d lambda at one level, by autograd through ``alpha_sigma`` in float64
        (chains override this with a closed form)."""
        # samplers call this under torch.no_grad / inference_mode (Pipeline.sample), where no
        # graph would be recorded and the derivative would silently read as 0: record one here
        with torch.inference_mode(False), torch.enable_grad():
            lam = torch.tensor(float(logsnr), dtype=torch.float64, requires_grad=True)
            alpha, _ = self.alpha_sigma(lam)
            log_alpha = torch.log(alpha)
            if not log_alpha.requires_grad:  # alpha does not depend on lambda (e.g. alpha = 1)
                return 0.0
            (grad,) = torch.autograd.grad(log_alpha, lam)
        return float(grad)

    def forward_sde(self, level: Level) -> tuple[float, float]:
        """(f, g^2) of the forward SDE dx = f x dtau + g dW in the time tau = -lambda.

        With marginals x = alpha x0 + sigma eps, matching the mean gives f = d log alpha / dtau
        and matching the variance gives g^2 = d sigma^2 / dtau - 2 f sigma^2
        = alpha^2 d(sigma^2 / alpha^2) / dtau = sigma^2 (since sigma^2 / alpha^2 = e^tau):
        every Gaussian chain diffuses at rate sigma^2 per unit of -lambda (Song et al. 2021,
        eq. 5, written in lambda; Kingma et al. 2021, appendix)."""
        return -self.dlog_alpha_dlogsnr(level.logsnr), level.sigma**2

    def reverse_sde(self, x: torch.Tensor, x0_hat: torch.Tensor, level: Level) -> tuple[torch.Tensor, float]:
        """(drift, g) of the reverse SDE in tau = -lambda: dx = (f x - g^2 score) dtau + g dW
        run backwards in tau (Anderson 1982; Song et al. 2021, eq. 6), with the score from the
        x0 estimate, score = (alpha x0_hat - x) / sigma^2."""
        f, g2 = self.forward_sde(level)
        score = (level.alpha * x0_hat - x) / level.sigma**2
        return f * x - g2 * score, math.sqrt(g2)

    def pf_ode(self, x: torch.Tensor, x0_hat: torch.Tensor, level: Level) -> torch.Tensor:
        """dx / dtau of the probability-flow ODE, f x - g^2 score / 2 (Song et al. 2021, eq. 13)."""
        f, g2 = self.forward_sde(level)
        score = (level.alpha * x0_hat - x) / level.sigma**2
        return f * x - 0.5 * g2 * score


def _attaching_chain(method: Callable[..., Level]) -> Callable[..., Level]:
    import functools

    @functools.wraps(method)
    def level(self, logsnr: float) -> Level:
        made = method(self, logsnr)
        return made if made.chain is self else Level(made.logsnr, made.alpha, made.sigma, self)

    level._attaches_chain = True  # type: ignore[attr-defined]
    return level


class PriorSource(Protocol):
    """Random numbers for a chain's initial state: per-sample, keyed by the sampling seed."""

    def sample(self, draw: int) -> torch.Tensor: ...

    def uniform(self, draw: int) -> torch.Tensor: ...


@attrs.frozen(kw_only=True)
class TrainingBatch:
    """What ``Chain.training_losses`` sees for one optimizer step's batch (or a rank's slice).

    ``x0`` is the encoded clean state (B, *state shape); ``logsnr`` (B,) float64 drawn by the
    weighting (``log_extra`` its optional per-sample log weight); ``noise.sample(draw)`` and
    ``noise.uniform(draw)`` give per-sample random numbers of the state's shape that depend
    only on (seed, step, position); ``network(x, logsnr, cond)`` runs the denoiser under the
    recipe's precision; ``components`` are the recipe's (with fitted modules in place).
    """

    x0: torch.Tensor
    cond: Optional[torch.Tensor]
    logsnr: torch.Tensor
    log_extra: Optional[torch.Tensor]
    noise: Any
    network: Callable[..., torch.Tensor]
    components: dict
    step: int


# --------------------------------------------------------------------------------------
# Reverse process: denoiser, parameterization, weighting
# --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class BuildContext:
    """What a denoiser's ``build`` may look at: the data spec and the recipe's components."""

    spec: DataSpec
    components: dict  # kind -> component instance


class Denoiser(Component):
    """A denoiser network factory.

    ``build(context)`` returns a ``torch.nn.Module`` whose ``forward(x, logsnr, cond=None)``
    takes the (input-scaled) noisy batch ``x`` of shape (B, *shape), per-sample logSNR of
    shape (B,) and an optional condition (B,) int64 class labels (-1: no condition), and
    returns a tensor shaped like ``x`` in the parameterization's output space. Set
    ``trainable = False`` for closed-form denoisers that need no training.
    """

    kind = "denoiser"
    trainable: ClassVar[bool] = True

    @abc.abstractmethod
    def build(self, context: BuildContext) -> torch.nn.Module: ...

    def uses_labels(self, spec: DataSpec) -> bool:
        """Whether the built network takes class labels for this data (default: no).

        Conditional denoisers are trained with the data's labels and sampled with labels
        drawn from the data's label frequencies (or one fixed label, ``sample.label``).
        """
        return False


class Parameterization(Component):
    """What the network predicts, and how that converts to x0 (survey sec. 4.2).

    All methods take tensors; ``alpha`` and ``sigma`` broadcast against ``x_t``.
    ``from_x0`` is the inverse of ``to_x0``: the output an ideal network would give if its
    x0 estimate were ``x0``. ``log_x0_mse_factor`` is log(||out - target||^2 / ||x0_hat -
    x0||^2), the factor that lets a weighting stated in x0 units apply to any target.
    """

    kind = "parameterization"

    def input_scale(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | float:
        """c_in: the network sees ``input_scale * x_t`` (1 unless preconditioned)."""
        return 1.0

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor: ...

    @abc.abstractmethod
    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor: ...

    @abc.abstractmethod
    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor: ...

    @abc.abstractmethod
    def log_x0_mse_factor(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


class Weighting(Component):
    """A training density over noise levels plus a loss weight (survey sec. 4.3.2).

    ``sample_logsnr(u, schedule)`` maps uniforms u in (0, 1) (float64, shape (B,)) to the
    training logSNRs. ``log_x0_weight(logsnr, alpha, sigma)`` is log w(lambda) for the
    x0-MSE; the trainer divides by the parameterization's MSE factor, so one weighting means
    the same objective whatever the network predicts.
    """

    kind = "weighting"

    @abc.abstractmethod
    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor: ...

    def build_module(self) -> "Optional[torch.nn.Module]":
        """A weighting that keeps statistics (e.g. importance sampling by the loss history,
        improved DDPM sec. 3.3) returns a ``torch.nn.Module`` here implementing this same
        interface plus ``update(logsnr, losses)``; the trainer uses the module instead of the
        component, calls ``update`` after every optimizer step with the batch's (detached)
        logSNRs and per-example losses, and stores the module's buffers in checkpoints, so a
        resumed run continues exactly. Stateless weightings return None."""
        return None

    def draw(self, u: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What the trainer calls: training logSNRs and an optional per-sample log weight
        added to ``log_x0_weight`` (for weights that depend on the schedule at the drawn
        point, such as the rate d lambda / dt of a likelihood weighting). The default draws
        ``sample_logsnr`` and adds nothing."""
        return self.sample_logsnr(u, schedule), None

    @abc.abstractmethod
    def log_x0_weight(self, logsnr: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------
# Sampling procedure: guidance, sampler
# --------------------------------------------------------------------------------------

#: ``predict(x, level, cond) -> x0``: the model's x0 estimate for a condition (or None)
ConditionalPredict = Callable[[torch.Tensor, Level, Optional[torch.Tensor]], torch.Tensor]
#: ``denoise(x, level) -> x0``: what samplers call
Denoise = Callable[[torch.Tensor, Level], torch.Tensor]


class Guidance(Component):
    """How a condition steers sampling (survey sec. 5.1), and what it changes in training.

    ``denoise(predict, x, level, cond)`` returns the guided x0 estimate, calling
    ``predict`` as often as it needs. ``training_condition(cond, u)`` may drop conditions
    during training (u: per-sample uniforms); the default keeps them. ``start(levels)``
    gives each sampling run its own state (see there).
    """

    kind = "guidance"

    def training_condition(self, cond: Optional[torch.Tensor], u: torch.Tensor) -> Optional[torch.Tensor]:
        return cond

    def start(self, levels: Optional[Sequence[Level]]) -> "Guidance":
        """Called by the sampling driver once per sampling run (each batch), before the first
        step, with the run's grid of levels (None where the caller does not know it); the run
        then calls ``denoise`` on the returned object. A guidance that keeps state across
        steps (a momentum) or needs the grid (the next level) returns a fresh object holding
        it, so runs never share state; stateless guidances return ``self`` (the default)."""
        return self

    @abc.abstractmethod
    def denoise(
        self, predict: ConditionalPredict, x: torch.Tensor, level: Level, cond: Optional[torch.Tensor]
    ) -> torch.Tensor: ...

    def denoise_deferred(
        self, predict: ConditionalPredict, x: torch.Tensor, level: Level, cond: Optional[torch.Tensor]
    ) -> "Optional[Prediction]":
        """The guided estimate with its final combine left to a fused sampling step: a
        :class:`fundiff.fused.Prediction` holding the branches ``predict`` returned and the
        weights (plus rescale / threshold / clip) that ``denoise`` would apply to them, so the
        step's kernel combines them in the same pass as the update. Return None (the default)
        where the guidance is not such a combine at this level; the driver then calls
        ``denoise``. Both must give the same estimate up to float32 rounding."""
        return None


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class Sampler(Component):
    """A sampler: walks a decreasing sequence of noise levels (survey sec. 5).

    ``sample(denoise, x, levels, noise, callback)`` starts from ``x`` at ``levels[0]`` and
    returns the state at ``levels[-1]`` (the clean level when it has sigma = 0).
    ``denoise(x, level)`` is the x0 estimate; ``levels`` are host-side :class:`Level`
    objects, so coefficients are Python floats and the loop never synchronises with the
    device. Fresh noise comes from ``noise.sample(draw)`` (zero mean, unit variance, of the
    recipe's noise type) with a draw index the sampler picks (its step index); ``callback(i, x, x0)`` is called after each step when given.
    Multi-evaluation methods call ``denoise`` as often as they need.
    """

    kind = "sampler"
    #: True for samplers whose step-size control reads the whole batch (adaptive solvers):
    #: they are exempt from the per-sample contract, so sample i depends on its batch
    couples_batch: ClassVar[bool] = False
    steps: int = attrs.field(default=50, validator=_at_least_one, metadata={"doc": "number of steps"})

    @abc.abstractmethod
    def sample(
        self,
        denoise: Denoise,
        x: torch.Tensor,
        levels: Sequence[Level],
        noise: Optional["NoiseSource"] = None,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    ) -> torch.Tensor: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every sampler, built-in or third-party, checks its inputs before the loop starts.
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("sample")
        if method is not None and not getattr(method, "__isabstractmethod__", False) and not getattr(method, "_checks_inputs", False):
            cls.sample = _checked_sample(method)


class NoiseSource(Protocol):
    """What samplers draw fresh noise from: ``sample(draw)`` returns a (batch, *shape) tensor."""

    def sample(self, draw: int) -> torch.Tensor: ...


def _checked_sample(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    import functools

    @functools.wraps(method)
    def sample(self, denoise, x, levels, noise=None, callback=None):
        check_sampler_inputs(type(self).__name__, denoise, x, levels)
        return method(self, denoise, x, levels, noise, callback)

    sample._checks_inputs = True  # type: ignore[attr-defined]
    return sample


def check_sampler_inputs(name: str, denoise: Any, x: Any, levels: Any) -> None:
    """Raise a ValueError naming the sampler and what it expected, before any computation."""
    if not callable(denoise):
        raise ValueError(f"{name}.sample: denoise must be a callable (x, level) -> x0, got {type(denoise).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}.sample: x must be a floating-point tensor of shape (batch, *data_shape), got {got}")
    if len(levels) < 2 or not all(isinstance(level, Level) for level in levels):
        raise ValueError(f"{name}.sample: levels must be a sequence of at least two fundiff.Level objects (see fundiff.noise_levels)")
    logsnrs = [level.logsnr for level in levels]
    if any(not b > a for a, b in zip(logsnrs, logsnrs[1:])):
        raise ValueError(f"{name}.sample: levels must go from noisy to clean (strictly increasing logSNR), got logSNRs {logsnrs[:6]}...")


class Spacing(Component):
    """Step selection: which noise levels a sampler visits (survey sec. 5.2.3).

    ``levels(schedule, chain, steps)`` returns ``steps + 1`` host-side :class:`Level`
    objects, strictly decreasing in noise, the last one clean (sigma = 0) unless the
    spacing deliberately stops early. Without a ``spacing`` section a recipe samples at
    t evenly spaced in [0, 1] (``fundiff.noise_levels``).
    """

    kind = "spacing"

    @abc.abstractmethod
    def levels(self, schedule: Schedule, chain: Chain, steps: int) -> list[Level]: ...

    def prepare(self, pipeline: Any, cache_dir: Optional[str]) -> "Spacing":
        """Return the spacing ready to use with ``pipeline``'s model (called by
        ``Pipeline.levels`` before ``levels``). A spacing that measures something with the
        model (e.g. a per-step cost table) does it here and may cache the result as a file in
        ``cache_dir`` (the run directory; None for a pipeline without one), keyed so that a
        changed model is measured again. The default needs no model and returns ``self``."""
        return self


@attrs.frozen
class LevelTensors:
    """Per-sample noise levels as tensors: ``logsnr``, ``alpha``, ``sigma`` of shape (B,),
    float64 (the training-time counterpart of the host-side :class:`Level`)."""

    logsnr: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor


class ReverseVariance(Component):
    """The variance of the reverse step p(x_s | x_t) for ancestral samplers (survey sec. 4.3.1).

    ``variance(s, t, v)`` is the per-element variance of p(x_s | x_t) for a host-side level
    ``s`` less noisy than ``t``: a Python float, or a tensor shaped like x when it depends on
    the network. ``v`` is the denoiser's raw learned-variance output at level ``t`` (shaped
    like x; see ``fundiff_plugins/denoisers/_variance.py``), given only to components with
    ``needs_network = True`` and None otherwise. A recipe without a ``variance`` section keeps
    each sampler's own variance (``ddpm``: the posterior's, beta tilde).

    Training: a component with ``needs_network`` makes the trainer call the network with
    ``return_variance=True``; ``training_levels`` picks the per-sample level s below each
    training level t and ``training_loss`` returns a (B,) term added to the per-example loss
    (None: nothing added).
    """

    kind = "variance"
    #: True when ``variance`` reads the network's learned-variance output ``v``
    needs_network: ClassVar[bool] = False

    @abc.abstractmethod
    def variance(self, s: Level, t: Level, v: Optional[torch.Tensor]) -> "float | torch.Tensor": ...

    def prepare(self, pipeline: Any, cache_dir: Optional[str]) -> "ReverseVariance":
        """Return the component ready to sample ``pipeline``'s model (called once per sampling
        run, before the first step). A variance estimated from the model (e.g. from moments
        of its predictions) is measured here and may be cached as a file in ``cache_dir``
        (the run directory; None without one), keyed so a changed model is measured again.
        The default needs no model and returns ``self``."""
        return self

    def training_levels(self, t: LevelTensors, schedule: Schedule, chain: Chain) -> Optional[LevelTensors]:
        """The per-sample levels s below the training levels ``t`` that ``training_loss``
        compares at (same shapes); None (the default) when the component adds no loss."""
        return None

    def training_loss(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        x0_hat: torch.Tensor,
        v: Optional[torch.Tensor],
        t: LevelTensors,
        s: LevelTensors,
        schedule: Schedule,
    ) -> Optional[torch.Tensor]:
        """A (B,) loss term added to the per-example denoising loss, from the data ``x0``, the
        noisy batch ``x_t`` at levels ``t``, the network's x0 estimate ``x0_hat`` (with its
        graph) and its variance output ``v``, for the levels ``s`` from ``training_levels``
        (``schedule``: the recipe's, e.g. for the number of terms of a summed bound).
        Default: None (fixed variances train nothing)."""
        return None


KIND_BASES: dict[str, type[Component]] = {
    "data": DataSet,
    "schedule": Schedule,
    "noise": Noise,
    "chain": Chain,
    "denoiser": Denoiser,
    "parameterization": Parameterization,
    "weighting": Weighting,
    "guidance": Guidance,
    "sampler": Sampler,
    "spacing": Spacing,
    "variance": ReverseVariance,
}
KINDS: tuple[str, ...] = tuple(KIND_BASES)
#: kinds a recipe may leave out; the core then uses its documented default behaviour
OPTIONAL_KINDS: frozenset[str] = frozenset({"spacing", "variance"})
