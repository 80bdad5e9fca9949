"""Self-guidance (Epstein et al. 2023, "Diffusion self-guidance for controllable image
generation", sec. 3, eq. 3): guide sampling with an energy E computed on the denoiser's own
internal activations, read through a forward hook on a named submodule.

Like classifier guidance, the energy acts as an extra score term -w grad_x E(x_t) on the
noisy marginal; with Tweedie's formula x0_hat = (x_t + sigma^2 score) / alpha the clean
estimate moves by

    delta x0 = -w sigma^2 / alpha * grad_x E(x_t)

(the paper's eq. 3, eps_hat + sigma w grad E, written for x0). The gradient is taken with
autograd through the network inside the no-grad sampling loop (``torch.enable_grad``), from
the same forward pass that gives x0_hat. Where alpha = 0 or sigma = 0 there is no finite
x0 form and the estimate is left unguided.

The shipped energy is feature matching (the paper's appearance term, sec. 3.2, in its
simplest form): keep the activations h(x_t) of ``module`` close to a target,

    E(x_t) = 1/2 mean_j (h_j(x_t) - h*_j)^2        (per sample; mean over the activation)

The target h* is either

* ``reference``: a safetensors file with a tensor ``x`` of reference examples (N, *shape) in
  data space (e.g. examples of one class, or their centroid); at each level the target is
  the mean activation of the noise-free reference points alpha x_ref at that level (eps = 0,
  so the target is deterministic), computed once per level per sampling run; or
* ``target``: a safetensors file with a tensor ``h`` of the module's activation for one
  example (the activation shape, or with a leading batch dimension of 1), used at every
  level.

``module`` is a name from the built network's ``named_modules()`` (e.g. ``blocks.0.fc2`` in
the mlp, ``mid`` in the U-Net); a name the network lacks is refused when the recipe loads.
"""

from __future__ import annotations

import os

import attrs
import torch

from fundiff import FundiffError, Guidance, hookimpl
from fundiff.checkpoint import load_checkpoint, save_checkpoint
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_MARGINALS, GAUSSIAN_NOISE
from fundiff.config import doc


def write_tensor_file(path: str, name: str, tensor: torch.Tensor) -> str:
    """Store ``tensor`` under ``name`` ("x" for references, "h" for targets) at ``path``."""
    save_checkpoint(path, {name: tensor.detach().cpu().contiguous()}, {"kind": "fundiff-self-guidance"})
    return path


def _read_tensor(path: str, name: str) -> torch.Tensor:
    try:
        tensors, _ = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - a safetensors file written by anything
        from safetensors.torch import load_file

        tensors = load_file(path)
    if name not in tensors:
        raise FundiffError(f"guidance 'self-guidance': {path} holds no tensor named {name!r} (has {sorted(tensors)})")
    return tensors[name]


def _output(value):
    """A module's output, or its first element when it returns a tuple or list."""
    return value[0] if isinstance(value, (tuple, list)) else value


def capture(model: torch.nn.Module, module: str, run):
    """``(run(), activation)``: call ``run`` with a forward hook on ``model``'s submodule
    ``module`` that keeps its output (the last call's)."""
    try:
        target = model.get_submodule(module)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise FundiffError(
            f"guidance 'self-guidance': the denoiser has no module {module!r}; its modules are {names[:40]}"
        ) from None
    seen = []
    handle = target.register_forward_hook(lambda mod, args, out: seen.append(_output(out)))
    try:
        result = run()
    finally:
        handle.remove()
    if not seen:
        raise FundiffError(f"guidance 'self-guidance': module {module!r} was not called by the denoiser's forward pass")
    return result, seen[-1]


def feature_energy(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample E = 1/2 mean_j (h_j - h*_j)^2 over the activation's non-batch elements."""
    diff = h - target.to(h.dtype)
    return 0.5 * diff.pow(2).flatten(1).mean(1)


@attrs.frozen(kw_only=True)
class SelfGuidance(Guidance):
    """x0_hat - w sigma^2 / alpha grad_x E(activations): feature matching on a named module."""

    requires = frozenset({GAUSSIAN_MARGINALS, GAUSSIAN_NOISE})

    module: str = attrs.field(default="", metadata=doc("name of the denoiser submodule whose output is matched (named_modules())"))
    scale: float = attrs.field(default=1.0, metadata=doc("w: weight of the energy; 0 = unguided"))
    reference: str = attrs.field(
        default="", metadata=doc("safetensors file with tensor 'x' (N, *shape): reference examples; target = their mean activation")
    )
    target: str = attrs.field(default="", metadata=doc("safetensors file with tensor 'h': the module's target activation"))

    def check_recipe(self, components):
        problems = []
        noise = components.get("noise")
        if noise is not None and CORRUPTION_OPERATOR in type(noise).provides:
            problems.append("guidance 'self-guidance' needs additive Gaussian noise (Tweedie's formula); this noise type also corrupts x0")
        if not self.module:
            problems.append("guidance 'self-guidance' needs module: the name of a denoiser submodule (see the network's named_modules())")
        if bool(self.reference) == bool(self.target):
            problems.append("guidance 'self-guidance' needs exactly one of reference (examples file, tensor 'x') and target (activation file, tensor 'h')")
        for field in ("reference", "target"):
            path = getattr(self, field)
            if path and not os.path.isfile(path):
                problems.append(f"guidance 'self-guidance': {field} file {path} not found")
        if self.module and not problems:
            problems += self._module_problems(components)
        return problems

    def _module_problems(self, components) -> list[str]:
        """Build the recipe's network once and look the module name up in it."""
        from fundiff import BuildContext

        denoiser, data = components.get("denoiser"), components.get("data")
        if denoiser is None or data is None:
            return []
        try:
            model = denoiser.build(BuildContext(spec=data.spec(), components=dict(components)))
        except Exception:  # noqa: BLE001 - the denoiser reports its own problems; checked again at first use
            return []
        names = {name for name, _ in model.named_modules() if name}
        if self.module in names:
            return []
        return [f"guidance 'self-guidance': the denoiser has no module {self.module!r}; its modules include {sorted(names)[:30]}"]

    def start(self, levels):
        return _SelfGuidanceRun(self)

    def denoise(self, predict, x, level, cond):
        return _SelfGuidanceRun(self).denoise(predict, x, level, cond)


class _SelfGuidanceRun:
    """One sampling run: caches the reference's target activation per level."""

    def __init__(self, guidance: SelfGuidance):
        self.guidance = guidance
        self.targets: dict = {}

    def target(self, predict, model, level, x: torch.Tensor) -> torch.Tensor:
        g = self.guidance
        key = (float(level.logsnr), str(x.device), x.dtype)
        if key not in self.targets:
            if g.target:
                h = _read_tensor(g.target, "h").to(x.device, x.dtype)
            else:
                ref = _read_tensor(g.reference, "x").to(x.device, x.dtype)
                if tuple(ref.shape[1:]) != tuple(x.shape[1:]):
                    raise FundiffError(
                        f"guidance 'self-guidance': reference examples have shape {tuple(ref.shape[1:])}, the samples {tuple(x.shape[1:])}"
                    )
                with torch.no_grad():
                    _, h = capture(model, g.module, lambda: predict(level.alpha * ref, level, None))
                h = h.mean(0, keepdim=True)
            self.targets[key] = h
        return self.targets[key]

    def denoise(self, predict, x, level, cond):
        g = self.guidance
        if g.scale == 0.0 or not (level.alpha > 0.0 and level.sigma > 0.0):
            return predict(x, level, cond)
        model = getattr(predict, "model", None)
        if model is None:
            raise FundiffError("guidance 'self-guidance' needs the denoiser network (predict.model, set by fundiff.pipeline.make_predict)")
        target = self.target(predict, model, level, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0, h = capture(model, g.module, lambda: predict(x_in, level, cond))
            if target.dim() == h.dim() - 1:  # one example's activation, without a batch dimension
                target = target[None]
            if tuple(target.shape) not in ((1,) + tuple(h.shape[1:]), tuple(h.shape)):
                raise FundiffError(
                    f"guidance 'self-guidance': module {g.module!r} gives activations of shape {tuple(h.shape[1:])} per sample, "
                    f"the target has shape {tuple(target.shape)}"
                )
            energy = feature_energy(h, target).sum()
            (grad,) = torch.autograd.grad(energy, x_in)
        return x0.detach() - (g.scale * level.sigma**2 / level.alpha) * grad.to(x0.dtype)


@hookimpl
def fundiff_register_guidances(register):
    register("self-guidance", SelfGuidance)
