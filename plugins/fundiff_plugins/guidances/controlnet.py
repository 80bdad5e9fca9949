"""ControlNet (Zhang et al. 2023, "Adding conditional control to text-to-image diffusion
models", sec. 3.1-3.2, eqs. 1-2 and Fig. 2): steer a frozen U-Net with a condition image
through a trainable copy of its encoder.

The copy (embeddings, input convolution, down path, middle block, initialised from the
frozen weights) receives the noisy input plus Z_in(c), a zero-initialised 3x3 convolution
of the condition image c, added after its input convolution; each of its skip features and
its middle output passes through a zero-initialised 1x1 convolution Z_k and is added to the
frozen U-Net's corresponding skip connection / middle output (eq. 2):

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)

Before training every Z is zero, so the controlled network *is* the frozen one (bit for
bit: adding exact zeros), and training starts from the frozen model's behaviour.

Here the condition is computed from the data itself: ``coarse(x0)``, the ``factor`` x
``factor`` average-pooled image upsampled back (nearest), so no extra data set is needed.
:func:`train_controlnet` (or ``fundiff train-controlnet RUN_DIR --steps N``) freezes the run's
sampling network (EMA weights when the run has them), trains the copy with the run's own
loss (parameterization, weighting, chain, noise) on (data, coarse(data)) and stores
``controlnet.safetensors`` in the run. The guidance loads it (``path``: the file or the run
directory) and reads the condition images from ``condition``: a safetensors file with a
tensor ``c`` of shape (N, C, H, W), one row per sample of a batch (N = batch size) or one row
for all.
"""

from __future__ import annotations

import os
import sys

import attrs
import torch

from fundiff import FundiffError, Guidance, hookimpl, rng
from fundiff.checkpoint import load_checkpoint, save_checkpoint
from fundiff.config import doc
from torch import nn
from torch.nn import functional as F

#: the file ``fundiff train-controlnet RUN_DIR`` writes into the run directory
CONTROLNET_FILE = "controlnet.safetensors"
_KIND = "fundiff-controlnet"


def coarse(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The condition: ``factor`` x ``factor`` average pooling, upsampled back (nearest)."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


def _zero_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """The trainable encoder copy with zero convolutions in and out; ``forward`` returns the
    residuals for :meth:`UNetModel.forward`."""

    def __init__(self, unet: nn.Module, condition_channels: int):
        super().__init__()
        if not hasattr(unet, "copy_encoder"):
            raise FundiffError("controlnet needs the 'unet' denoiser (a network with copy_encoder / encode / residuals)")
        self.encoder = unet.copy_encoder()
        self.condition_in = _zero_conv(condition_channels, unet.input.out_channels, 3)
        self.outputs = nn.ModuleList(_zero_conv(c, c, 1) for c in unet.feature_channels)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None, condition: torch.Tensor) -> list[torch.Tensor]:
        features, _, _ = self.encoder.encode(x, logsnr, cond, input_residual=self.condition_in(condition.to(x.dtype)))
        return [zero(f) for zero, f in zip(self.outputs, features)]


class Controlled(nn.Module):
    """The frozen U-Net with the ControlNet's residuals, for one condition batch (``condition``)."""

    def __init__(self, unet: nn.Module, controlnet: ControlNet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.condition: torch.Tensor | None = None

    def forward(self, x, logsnr, cond=None, return_variance: bool = False):
        residuals = self.controlnet(x, logsnr, cond, self.condition)
        return self.unet(x, logsnr, cond, return_variance=return_variance, residuals=residuals)


# --------------------------------------------------------------------------------------
# Training and storage
# --------------------------------------------------------------------------------------


def train_controlnet(
    pipeline, *, steps: int = 1000, batch_size: int | None = None, lr: float = 1e-3, factor: int = 2,
    path: str | None = None, quiet: bool = True,
) -> ControlNet:
    """Train a ControlNet on a trained :class:`fundiff.Pipeline` with the run's loss
    (``Pipeline.loss`` with the controlled network as its forward model), the condition being
    ``coarse(x0, factor)`` of each batch's data; save it to ``path`` when given."""
    spec = pipeline.spec
    if len(spec.shape) != 3 or spec.shape[1] % factor or spec.shape[2] % factor:
        raise FundiffError(f"controlnet needs images (C, H, W) with H and W divisible by factor {factor}; the data has shape {spec.shape}")
    frozen = pipeline.sampling_model(True).requires_grad_(False)
    controlnet = ControlNet(frozen, spec.shape[0]).to(pipeline.device)
    controlled = Controlled(frozen, controlnet)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr)
    batch_size = batch_size or pipeline.recipe.train.batch_size
    seed, data, positions = pipeline.recipe.train.seed, pipeline.data, torch.arange(batch_size)
    previous = pipeline.forward_model
    pipeline.forward_model = controlled
    losses = []
    try:
        for step in range(steps):
            # the batch Pipeline.per_example_losses draws for this step (same stream and formula)
            index = (rng.uniform(seed, rng.STREAM_TRAIN_DATA, step, positions) * data.x.shape[0]).long()
            controlled.condition = coarse(data.x[index].to(pipeline.device), factor)
            loss = pipeline.loss(step, batch_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if not quiet and (step + 1) % max(1, steps // 10) == 0:
                print(f"controlnet step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", file=sys.stderr)
    finally:
        pipeline.forward_model = previous
    controlnet.eval().requires_grad_(False)
    if path is not None:
        meta = {"kind": _KIND, "shape": list(spec.shape), "factor": factor, "steps": steps, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}
        save_checkpoint(path, controlnet.state_dict(), meta)
    return controlnet


def train_controlnet_for_run(run_dir: str, *, steps: int = 1000, quiet: bool = True, **options) -> str:
    """``fundiff train-controlnet RUN_DIR``: train on the run, store ``RUN_DIR/controlnet.safetensors``."""
    from fundiff import load_run

    pipeline = load_run(run_dir, device="cpu" if not torch.cuda.is_available() else None)
    path = os.path.join(os.fspath(run_dir), CONTROLNET_FILE)
    train_controlnet(pipeline, steps=steps, path=path, quiet=quiet, **options)
    return path


def resolve_path(path: str) -> str:
    """A ControlNet file, or a run directory holding ``controlnet.safetensors``."""
    return os.path.join(path, CONTROLNET_FILE) if os.path.isdir(path) else path


def write_condition(path: str, condition: torch.Tensor) -> str:
    """Store condition images (N, C, H, W) as the tensor ``c`` the guidance reads."""
    save_checkpoint(path, {"c": condition.detach().cpu().contiguous()}, {"kind": "fundiff-controlnet-condition"})
    return path


def load_controlnet(path: str, unet: nn.Module) -> ControlNet:
    """The stored ControlNet, built around ``unet`` (the frozen network it was trained for)."""
    tensors, meta = load_checkpoint(resolve_path(path))
    if meta.get("kind") != _KIND:
        raise FundiffError(f"{path} is not a ControlNet written by fundiff train-controlnet")
    param = next(unet.parameters())
    controlnet = ControlNet(unet, int(tensors["condition_in.weight"].shape[1]))
    try:
        controlnet.load_state_dict(tensors)
    except RuntimeError as exc:
        raise FundiffError(f"{path} does not fit this run's U-Net (trained for another architecture): {exc}") from None
    return controlnet.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# The guidance
# --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ControlNetGuidance(Guidance):
    """The frozen U-Net plus a trained ControlNet's residuals for given condition images."""

    path: str = attrs.field(default="", metadata=doc("ControlNet file, or a run directory holding controlnet.safetensors (fundiff train-controlnet)"))
    condition: str = attrs.field(default="", metadata=doc("safetensors file with tensor 'c' (N, C, H, W): the condition images (N = 1 or the batch size)"))
    scale: float = attrs.field(default=1.0, metadata=doc("multiplies the residuals: 0 = the frozen model, 1 = as trained"))

    def check_recipe(self, components):
        problems = []
        denoiser = components.get("denoiser")
        if denoiser is not None and type(denoiser).__name__ != "UNet":
            problems.append("guidance 'controlnet' needs denoiser 'unet' (it copies the U-Net's encoder)")
        if not self.path:
            problems.append("guidance 'controlnet' needs path: a ControlNet trained with `fundiff train-controlnet RUN_DIR` (then path: RUN_DIR)")
        elif not os.path.isfile(resolve_path(self.path)):
            problems.append(f"guidance 'controlnet': no ControlNet at {resolve_path(self.path)}; train one with `fundiff train-controlnet RUN_DIR`")
        if not self.condition:
            problems.append("guidance 'controlnet' needs condition: a safetensors file with tensor 'c' (N, C, H, W) of condition images")
        elif not os.path.isfile(self.condition):
            problems.append(f"guidance 'controlnet': condition file {self.condition} not found")
        return problems

    def start(self, levels):
        return _ControlNetRun(self)

    def denoise(self, predict, x, level, cond):
        return _ControlNetRun(self).denoise(predict, x, level, cond)


class _ControlNetRun:
    """One sampling run: the ControlNet and condition, loaded on first use."""

    def __init__(self, guidance: ControlNetGuidance):
        self.guidance = guidance
        self.controlnet: ControlNet | None = None
        self.images: torch.Tensor | None = None

    def denoise(self, predict, x, level, cond):
        g = self.guidance
        model = getattr(predict, "model", None)
        if model is None:
            raise FundiffError("guidance 'controlnet' needs the denoiser network (predict.model, set by fundiff.pipeline.make_predict)")
        if self.controlnet is None:
            self.controlnet = load_controlnet(g.path, model)
            tensors, _ = load_checkpoint(g.condition)
            if "c" not in tensors:
                raise FundiffError(f"guidance 'controlnet': {g.condition} holds no tensor 'c'")
            self.images = tensors["c"]
        images = self.images
        if tuple(images.shape[1:]) != tuple(x.shape[1:]) or images.shape[0] not in (1, x.shape[0]):
            raise FundiffError(
                f"guidance 'controlnet': condition images have shape {tuple(images.shape)}; need (1 or {x.shape[0]}, {', '.join(map(str, x.shape[1:]))})"
            )
        condition = images.to(x.device, x.dtype).expand(x.shape[0], *images.shape[1:])
        controlnet, scale = self.controlnet, g.scale

        def inject(module, args, kwargs):
            x_in, logsnr = args[0], args[1]
            labels = args[2] if len(args) > 2 else kwargs.get("cond")
            residuals = [scale * r for r in controlnet(x_in, logsnr, labels, condition)]
            return args, {**kwargs, "residuals": residuals}

        handle = model.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            return predict(x, level, cond)
        finally:
            handle.remove()


@hookimpl
def fundiff_register_guidances(register):
    register("controlnet", ControlNetGuidance)
