"""A product of Gaussian chains over named parts of the state (survey sec. 3.2.2, the
systematic method: several transition chains applied jointly, e.g. data and its label
diffused together, or frequency bands perturbed at different speeds).

Each part owns a channel range [start, stop) of axis 1 (the feature axis of points, the
channel axis of images), a Gaussian chain (default ``vp``) and a schedule (default
``cosine``). Every part gets its own noise (the recipe's noise type drawn for the whole
state, so parts share no noise element) and its own noise level. The parts share one time t:

    t = parts[0].schedule.t_from_logsnr(lambda),    lambda_i = parts[i].schedule.logsnr(t),

where lambda, the currency the recipe's schedule, weighting, spacing and samplers exchange,
is the first part's logSNR (the level's alpha and sigma are the first part's too). The
network sees lambda as its time input; the other parts' levels are known functions of it.
The clean level lambda = +inf is clean in every part, so sampling ends on the data.

Objective: the network predicts x0 of every part (the recipe's parameterization must be
``x0``: a sampler's ``denoise`` then returns the network output itself, which stays right
whatever each part's noise level; an eps or v output converted with the first part's alpha
and sigma would be wrong in the others). The per-example loss is

    sum_i weight_i (n_i / n) w(lambda_i) ||x0_hat_i - x0_i||^2 / n_i,

the recipe's weighting w evaluated in x0 units at each part's own level (``eps-mse``: the
per-part eps-MSE, ``uniform-t`` with ``loss: x0``: the per-part x0-MSE, ``min-snr``: capped),
n_i the part's element count: with one part and weight 1 it is the ordinary Gaussian loss.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, Level, Schedule, hookimpl
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_MARGINALS, DataSpec
from fundiff.config import doc, greater_than
from fundiff.errors import FundiffError
from fundiff_plugins.chains.vp import VariancePreserving
from fundiff_plugins.schedules.cosine import Cosine

#: capability of the product chain: per-part noise levels that its samplers walk
PRODUCT_STATE = "product-state"


def _channels(instance, attribute, value) -> None:
    start, stop = value
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"must be [start, stop] with 0 <= start < stop (stop null: to the end of axis 1), got {list(value)}")


@attrs.frozen(kw_only=True)
class Part:
    """One part of a product chain's state: channels [start, stop) of axis 1 with its own chain and schedule."""

    name: str = attrs.field(metadata=doc("name of the part (for messages and docs)"))
    channels: tuple[int, int | None] = attrs.field(
        validator=_channels, metadata=doc("[start, stop) on axis 1; stop null: to the end")
    )
    chain: Chain = attrs.field(factory=VariancePreserving, metadata=doc("the part's Gaussian chain (a nested chain section)"))
    schedule: Schedule = attrs.field(factory=Cosine, metadata=doc("the part's schedule (a nested schedule section)"))
    weight: float = attrs.field(default=1.0, validator=greater_than(0.0), metadata=doc("the part's loss weight"))


def _parts(instance, attribute, value) -> None:
    if not value:
        raise ValueError("needs at least one part")
    names = [part.name for part in value]
    if len(set(names)) != len(names):
        raise ValueError(f"part names must be unique, got {names}")
    expected = 0
    for i, part in enumerate(value):
        start, stop = part.channels
        if start != expected:
            raise ValueError(
                f"parts must tile axis 1 in order without gaps or overlaps: part '{part.name}' starts at {start}, expected {expected}"
            )
        if stop is None and i != len(value) - 1:
            raise ValueError(f"only the last part may run to the end of axis 1 (stop null); part '{part.name}' is not last")
        expected = stop if stop is not None else expected


@attrs.frozen(kw_only=True)
class Product(Chain):
    """Gaussian sub-chains over channel ranges of the state, one shared time, per-part noise levels."""

    provides = frozenset({PRODUCT_STATE})

    parts: tuple[Part, ...] = attrs.field(
        factory=lambda: (Part(name="all", channels=(0, None)),),
        validator=_parts,
        metadata=doc("the parts: [{name, channels: [start, stop], chain, schedule, weight}, ...], tiling axis 1 in order"),
    )

    # ---------------------------------------------------------------- recipe check

    def check_recipe(self, components):
        problems = []
        for part in self.parts:
            if GAUSSIAN_MARGINALS not in type(part.chain).provides:
                problems.append(
                    f"chain 'product': part '{part.name}' needs a chain that provides '{GAUSSIAN_MARGINALS}' "
                    f"(its levels use the Gaussian posterior), got {type(part.chain).__name__}; use e.g. chain: vp"
                )
            if part.schedule.build_module() is not None:
                problems.append(
                    f"chain 'product': part '{part.name}' has a learned schedule, which the product's own loss does not train; use a fixed one"
                )
        data = components.get("data")
        if data is not None:
            try:
                self.state_spec(data.spec())
            except FundiffError as exc:
                problems.append(str(exc))
        param = components.get("parameterization")
        if param is not None and not _is_x0_prediction(param):
            problems.append(
                "chain 'product' converts the network output to x0 at each part's own noise level, which only x0 "
                "prediction leaves unchanged; use parameterization: x0"
            )
        noise = components.get("noise")
        if noise is not None and CORRUPTION_OPERATOR in type(noise).provides:
            problems.append(
                "chain 'product' adds noise per part and applies no corruption operator; use an additive noise (e.g. gaussian)"
            )
        schedule = components.get("schedule")
        if schedule is not None and schedule.build_module() is not None:
            problems.append(
                "chain 'product' trains with its own loss, which does not train a learned schedule; use a fixed schedule"
            )
        return problems

    # ---------------------------------------------------------------- levels

    def _ranges(self, channels: int) -> list[tuple[int, int]]:
        return [(part.channels[0], part.channels[1] if part.channels[1] is not None else channels) for part in self.parts]

    def part_logsnrs(self, logsnr: torch.Tensor) -> list[torch.Tensor]:
        """lambda_i for each part from the first part's lambda (float64 tensors), through the
        shared time t; +inf (clean) and -inf map to +inf and lambda_i(1) in every part."""
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        first = self.parts[0].schedule
        finite = torch.isfinite(lam)
        t = first.t_from_logsnr(torch.where(finite, lam, torch.zeros_like(lam)))
        t = torch.where(lam == -math.inf, torch.ones_like(t), t)
        out = [lam]
        for part in self.parts[1:]:
            lam_i = part.schedule.logsnr(t)
            out.append(torch.where(lam == math.inf, torch.full_like(lam_i, math.inf), lam_i))
        return out

    def part_levels(self, level: Level) -> list[Level]:
        """The host-side level of every part at ``level`` (the first part's is ``level`` itself)."""
        lams = self.part_logsnrs(torch.tensor([level.logsnr], dtype=torch.float64))
        return [part.chain.level(float(lam[0])) for part, lam in zip(self.parts, lams)]

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts[0].chain.alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        made = self.parts[0].chain.level(float(logsnr))
        return Level(logsnr=made.logsnr, alpha=made.alpha, sigma=made.sigma)

    def forward_sde(self, level: Level) -> tuple[float, float]:
        """Each part has its own SDE in its own lambda_i; one (f, g^2) cannot describe them."""
        raise FundiffError(
            "chain 'product' has one SDE per part, each in its own logSNR: there is no single (f, g^2) "
            "(forward_sde, reverse_sde, pf_ode); use part_levels(level) and each part's chain"
        )

    # ---------------------------------------------------------------- state

    def state_spec(self, spec: DataSpec) -> DataSpec:
        channels = spec.shape[0]
        stop = self.parts[-1].channels[1]
        if (stop is not None and stop != channels) or any(b > channels for _, b in self._ranges(channels)):
            layout = ", ".join(f"{p.name}: {list(p.channels)}" for p in self.parts)
            raise FundiffError(
                f"chain 'product': the parts ({layout}) must tile axis 1 of the data, which has {channels} channels; "
                f"end the last part at {channels} (or null)"
            )
        return spec

    def split_parts(self, state: torch.Tensor) -> list[torch.Tensor]:
        """The parts of a state (or of anything shaped like it), in order."""
        return [state[:, a:b] for a, b in self._ranges(state.shape[1])]

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [part.chain.prior(lvl, n) for part, lvl, n in zip(self.parts, self.part_levels(level), self.split_parts(noise))],
            dim=1,
        )

    def _part_alpha_sigma(self, logsnr: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(lambda_i, alpha_i, sigma_i) per part for per-sample lambda (B,)."""
        return [(lam, *part.chain.alpha_sigma(lam)) for part, lam in zip(self.parts, self.part_logsnrs(logsnr))]

    def perturb(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Each part perturbed by its own chain at its own level; (alpha, sigma) are the first
        part's, from which lambda and so every part's level follow."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        lam = (2.0 * (torch.log(alpha) - torch.log(sigma))).expand(x0.shape[0])
        return self._perturb_parts(x0, noise, self._part_alpha_sigma(lam.cpu()))

    def _perturb_parts(self, x0, noise, levels) -> torch.Tensor:
        out = []
        for part, x0_i, eps_i, (_, a, s) in zip(self.parts, self.split_parts(x0), self.split_parts(noise), levels):
            shape = (-1,) + (1,) * (x0.ndim - 1)
            out.append(
                part.chain.perturb(
                    x0_i, eps_i, a.reshape(shape).to(x0.device, x0.dtype), s.reshape(shape).to(x0.device, x0.dtype)
                )
            )
        return torch.cat(out, dim=1)

    # ---------------------------------------------------------------- training

    def training_losses(self, batch):
        """Per-part x0 error weighted by the recipe's weighting at each part's level (see the module docstring)."""
        x0 = batch.x0
        levels = self._part_alpha_sigma(batch.logsnr.cpu())
        x_t = self._perturb_parts(x0, batch.noise.sample(0), levels)
        out = batch.network(x_t, batch.logsnr.to(x0.device, x0.dtype), batch.cond).to(x0.dtype)
        weighting = batch.components["weighting"]
        total = x0[0].numel()
        losses = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for part, out_i, x0_i, (lam, a, s) in zip(self.parts, self.split_parts(out), self.split_parts(x0), levels):
            log_w = weighting.log_x0_weight(lam, a, s)
            if batch.log_extra is not None:
                log_w = log_w + batch.log_extra.to(torch.float64).cpu()
            share = part.weight * x0_i[0].numel() / total
            weight = (share * torch.exp(log_w)).to(x0.device, x0.dtype)
            losses = losses + weight * ((out_i - x0_i) ** 2).flatten(1).mean(1)
        return losses


def _is_x0_prediction(param) -> bool:
    """Whether a parameterization's output is x0 itself (target x0, to_x0 the identity, no
    input scaling), checked on a probe so third-party x0 parameterizations pass."""
    gen = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(3, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    alpha = torch.tensor([[0.3], [0.8], [0.95]], dtype=torch.float64)
    sigma = torch.tensor([[0.9], [0.5], [0.2]], dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    try:
        scale = param.input_scale(alpha, sigma)
        ok = torch.allclose(torch.as_tensor(scale, dtype=torch.float64), torch.ones((), dtype=torch.float64))
        ok = ok and torch.allclose(param.target(x0, eps, x_t, alpha, sigma), x0)
        return ok and torch.allclose(param.to_x0(out, x_t, alpha, sigma), out)
    except Exception:  # noqa: BLE001 - a parameterization that cannot run the probe is not x0 prediction
        return False


@hookimpl
def fundiff_register_chains(register):
    register("product", Product)
