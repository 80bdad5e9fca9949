"""diffusers' ``UNet2DModel`` as a fundiff denoiser (the optional extra ``fundiff[diffusers]``).

The network is built from a config, which is either an inline mapping of ``UNet2DModel``
keyword arguments in the recipe, or the path of a local ``config.json`` (or of a directory
holding one). Weights, when given, come from a local path only: a directory written by
``save_pretrained(..., safe_serialization=True)`` (its own ``config.json`` then defines the
network) or a single ``.safetensors`` file whose tensors match the config. Nothing is
downloaded and no pickle file is ever read.

**The noise level.** fundiff hands every denoiser the logSNR lambda; a diffusers U-Net takes
the timestep tau it was trained with. The wrapper maps one to the other through the recipe's
own schedule: t = ``schedule.t_from_logsnr(lambda)`` in [0, 1], then

    tau = T t - 1,    T = num_train_timesteps.

The ``- 1`` is the indexing: diffusers' schedulers keep alphas_cumprod[tau] = prod_{i <= tau}
(1 - beta_i) with beta 0-indexed, for tau = 0 .. T - 1, while fundiff's discrete schedules put
alpha_bar_k = prod_{i <= k} (1 - beta_i), k = 1 .. T, at t = k / T (``DiscreteSchedule``). So
the pretrained model saw tau at the level fundiff calls t = (tau + 1) / T. Between grid
points tau is fractional; the sinusoidal ("positional") time embedding of ``UNet2DModel`` is
defined for any real tau. A "learned" embedding (one row per integer timestep) gets tau
rounded and clamped to [0, T - 1]. The Fourier embedding (score-SDE models, which take sigma
as the "timestep") is refused.

**What must match the pretrained model.** The recipe's schedule (``linear``,
``scaled-linear``, ``cosine``, with the same betas and T; ``fundiff convert diffusers-config``
turns a ``scheduler_config.json`` into these sections), the parameterization (diffusers'
``prediction_type``: ``epsilon`` is ``eps``, ``v_prediction`` is ``v``, ``sample`` is
``x0``), the VP chain and the data range the model was trained on ([-1, 1] for the DDPM
pipelines). Nothing in the weights records these, so the wrapper cannot check them; a
mismatch does not fail, it samples badly.

**Class labels.** With ``num_class_embeds`` in the config and labelled data, labels reach
the U-Net as ``class_labels``. The null label (-1, or no condition: what classifier-free
guidance drops to) is row ``num_classes`` of the class embedding, so CFG needs
``num_class_embeds = num_classes + 1``.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Optional, Union

import attrs
import torch
from torch import nn

from fundiff import BuildContext, Denoiser, DiscreteSchedule, FundiffError, hookimpl
from fundiff.config import at_least, doc
from fundiff.errors import suggest

from ._layers import image_problems

INSTALL_HINT = "pip install 'fundiff[diffusers]'"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_TRAIN_TIMESTEPS = 1000  # diffusers' schedulers' default num_train_timesteps


def _unet_class():
    """``diffusers.UNet2DModel``, imported only when a recipe uses this denoiser."""
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        raise FundiffError(
            f"denoiser 'diffusers-unet' needs the diffusers package ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    return UNet2DModel


def _plain(value: Any) -> Any:
    """A JSON-like copy (tuples become lists), so the recipe round-trips through YAML."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise FundiffError(f"denoiser.{what}: cannot read {path} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise FundiffError(f"denoiser.{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FundiffError(f"denoiser.{what}: {path} must hold a JSON object of UNet2DModel arguments")
    return data


class DiffusersUNetModel(nn.Module):
    """The fundiff denoiser interface around a ``UNet2DModel``: forward(x, logsnr, cond)."""

    def __init__(self, unet: nn.Module, schedule, num_train_timesteps: int, num_classes: int):
        super().__init__()
        self.unet = unet
        self.schedule = schedule  # a frozen component, not a module: copied with the network
        self.num_train_timesteps = num_train_timesteps
        self.num_classes = num_classes  # 0: the U-Net is not given labels
        self.learned_time_embedding = unet.config.time_embedding_type == "learned"

    def timesteps(self, logsnr: torch.Tensor) -> torch.Tensor:
        """tau = T t(lambda) - 1 (see the module docs), in float64 from the recipe's schedule."""
        # the schedule's tables are made on the logSNR's device, so CUDA input stays on the GPU
        with torch.device(logsnr.device):
            t = self.schedule.t_from_logsnr(logsnr.detach().to(torch.float64))
        tau = t * self.num_train_timesteps - 1.0
        if self.learned_time_embedding:
            return tau.round().clamp(0, self.num_train_timesteps - 1).long()
        return tau.to(torch.float32)

    def class_labels(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        labels = torch.full((batch,), -1, dtype=torch.long, device=device) if cond is None else cond.long()
        null = labels < 0
        rows = self.unet.class_embedding.num_embeddings
        if rows <= self.num_classes and bool(null.any()):
            raise FundiffError(
                f"denoiser 'diffusers-unet' got the null label (no condition, as classifier-free guidance uses), but the "
                f"config's num_class_embeds ({rows}) has no row for it; set num_class_embeds to {self.num_classes + 1}"
            )
        return torch.where(null, torch.full_like(labels, self.num_classes), labels)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        labels = self.class_labels(cond, x.shape[0], x.device)
        return self.unet(x, self.timesteps(logsnr), class_labels=labels).sample


@attrs.frozen(kw_only=True)
class DiffusersUNet(Denoiser):
    """diffusers' UNet2DModel from an inline or local config, optionally with local safetensors weights."""

    # typing.Union / Optional, not X | Y: fundiff.config structures recipe values by typing.Union
    config: Union[str, dict, None] = attrs.field(  # noqa: UP007
        default=None,
        converter=_plain,
        hash=False,
        metadata=doc(
            "UNet2DModel keyword arguments (a mapping), or the path of a config.json or of a directory holding one "
            "(relative paths: to the working directory); leave out when weights is a save_pretrained directory"
        ),
    )
    weights: Optional[str] = attrs.field(  # noqa: UP045
        default=None,
        metadata=doc(
            "local weights: a save_pretrained directory (safetensors) or a .safetensors file; none: fresh initialisation"
        ),
    )
    num_train_timesteps: Optional[int] = attrs.field(  # noqa: UP045
        default=None,
        validator=at_least(2),
        metadata=doc("T of tau = T t - 1 (default: the schedule's num_steps, else the config's, else 1000)"),
    )

    # ---------------------------------------------------------------- configuration

    def _source(self) -> tuple[dict[str, Any], str]:
        """The UNet2DModel config and where it came from (for messages)."""
        if isinstance(self.config, dict):
            return dict(self.config), "denoiser.config"
        if isinstance(self.config, str):
            path = os.path.join(self.config, CONFIG_FILE) if os.path.isdir(self.config) else self.config
            return _read_json(path, "config"), path
        if self.weights is not None and os.path.isdir(self.weights):
            return _read_json(os.path.join(self.weights, CONFIG_FILE), "weights"), os.path.join(self.weights, CONFIG_FILE)
        raise FundiffError(
            "denoiser 'diffusers-unet' needs a config: set denoiser.config to a mapping of UNet2DModel arguments or to "
            "a config.json path, or denoiser.weights to a save_pretrained directory"
        )

    def unet_config(self) -> dict[str, Any]:
        """The UNet2DModel keyword arguments (keys diffusers writes for itself, ``_class_name``
        and ``_diffusers_version``, removed), checked against UNet2DModel's signature."""
        config, where = self._source()
        class_name = config.pop("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise FundiffError(f"{where}: _class_name is {class_name!r}; denoiser 'diffusers-unet' wraps UNet2DModel only")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        known = [name for name in inspect.signature(_unet_class().__init__).parameters if name != "self"]
        for key in config:
            if key not in known:
                raise FundiffError(
                    f"{where}: {key!r} is not an argument of UNet2DModel; {suggest(key, known)}see diffusers' UNet2DModel"
                )
        if isinstance(self.config, (dict, str)) and self.weights is not None and os.path.isdir(self.weights):
            raise FundiffError(
                "denoiser.config: leave it out when denoiser.weights is a save_pretrained directory (its config.json "
                "defines the network), or point weights at the .safetensors file"
            )
        return config

    def train_timesteps(self, schedule, config: dict[str, Any]) -> int:
        if self.num_train_timesteps is not None:
            return self.num_train_timesteps
        if isinstance(schedule, DiscreteSchedule):
            return schedule.num_steps
        return int(config.get("num_train_timesteps") or DEFAULT_TRAIN_TIMESTEPS)

    @staticmethod
    def _labels_used(config: dict[str, Any], spec) -> bool:
        return config.get("num_class_embeds") is not None and spec.num_classes > 0

    def uses_labels(self, spec) -> bool:
        # from the config as written: a config with other problems (reported by check_recipe)
        # still says whether labels are meant, so the guidance does not report a second one
        try:
            return self._labels_used(self._source()[0], spec)
        except FundiffError:
            return False

    def check_recipe(self, components) -> list[str]:
        try:
            config = self.unet_config()
            if self.weights is not None and not os.path.exists(self.weights):
                raise FundiffError(f"denoiser.weights: {self.weights} does not exist")
        except FundiffError as exc:
            return [str(exc)]
        levels = len(config.get("down_block_types", ())) or 4  # UNet2DModel's default has four
        problems = image_problems(
            "diffusers-unet", components, 2 ** (levels - 1), f"{levels} down blocks, all but the last halving"
        )
        if problems:
            return problems
        data = components.get("data")
        if data is not None:
            spec = data.spec()
            channels, height, width = spec.shape
            for key in ("in_channels", "out_channels"):
                value = config.get(key, 3)  # UNet2DModel's default
                if value != channels:
                    fix = " (a learned variance head is not supported)" if key == "out_channels" and value == 2 * channels else ""
                    problems.append(
                        f"denoiser 'diffusers-unet': the config's {key} is {value}, but the data has {channels} channels "
                        f"(shape {tuple(spec.shape)}){fix}; use a config with {key}: {channels}"
                    )
            size = config.get("sample_size")
            if size is not None:
                size_hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
                if size_hw != (height, width):
                    problems.append(
                        f"denoiser 'diffusers-unet': the config's sample_size is {size}, but the data is {height}x{width}; "
                        f"use a config with sample_size: {height if height == width else [height, width]}"
                    )
            if config.get("num_class_embeds") is not None and spec.num_classes > 0:
                if config.get("class_embed_type") is not None:
                    problems.append(
                        f"denoiser 'diffusers-unet': class_embed_type {config['class_embed_type']!r} does not take class "
                        "indices; leave it out and set num_class_embeds"
                    )
                elif config["num_class_embeds"] < spec.num_classes:
                    problems.append(
                        f"denoiser 'diffusers-unet': num_class_embeds is {config['num_class_embeds']}, fewer than the data's "
                        f"{spec.num_classes} classes; set it to {spec.num_classes + 1} (one more row for the null label)"
                    )
                elif config["num_class_embeds"] == spec.num_classes and getattr(components.get("guidance"), "drop_prob", 0) > 0:
                    problems.append(
                        f"denoiser 'diffusers-unet': the guidance drops labels (drop_prob > 0) to the null label, which needs "
                        f"a row of its own; set num_class_embeds to {spec.num_classes + 1}"
                    )
        if config.get("time_embedding_type", "positional") == "fourier":
            problems.append(
                "denoiser 'diffusers-unet': time_embedding_type 'fourier' takes sigma rather than a timestep (score-SDE "
                "models); use 'positional' or 'learned'"
            )
        schedule = components.get("schedule")
        if isinstance(schedule, DiscreteSchedule) and self.num_train_timesteps not in (None, schedule.num_steps):
            problems.append(
                f"denoiser 'diffusers-unet': num_train_timesteps ({self.num_train_timesteps}) differs from the schedule's "
                f"num_steps ({schedule.num_steps}); the two must describe the same discrete chain"
            )
        variance = components.get("variance")
        if variance is not None and type(variance).needs_network:
            problems.append(
                "denoiser 'diffusers-unet' has no learned-variance output; use a variance that does not read the network "
                "(e.g. fixed-small) or leave the section out"
            )
        if not problems:
            problems += self._construct_problems(config)
        return problems

    @staticmethod
    def _construct_problems(config: dict[str, Any]) -> list[str]:
        """UNet2DModel's own refusals (mismatched block lists, ...), found by building it on
        the meta device (shapes only)."""
        try:
            with torch.device("meta"):
                _unet_class()(**config)
        except FundiffError as exc:
            return [str(exc)]
        except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as exc:
            return [f"denoiser 'diffusers-unet': UNet2DModel refuses the config: {exc}"]
        return []

    # ---------------------------------------------------------------- building

    def _load_weights(self, unet: nn.Module) -> nn.Module:
        """``unet`` with the local safetensors weights (never pickle, never a download)."""
        from safetensors.torch import load_file

        if os.path.isdir(self.weights):
            single, index = os.path.join(self.weights, WEIGHTS_FILE), os.path.join(self.weights, WEIGHTS_INDEX)
            if os.path.exists(single):
                files = [single]
            elif os.path.exists(index):  # a sharded save_pretrained: the index names the shards
                shards = _read_json(index, "weights").get("weight_map", {})
                files = [os.path.join(self.weights, name) for name in sorted(set(shards.values()))]
            else:
                raise FundiffError(
                    f"denoiser.weights: {self.weights} has no {WEIGHTS_FILE}; only safetensors weights are read (no pickle): "
                    "save the model with save_pretrained(path, safe_serialization=True)"
                )
        elif self.weights.endswith(".safetensors"):
            files = [self.weights]
        else:
            raise FundiffError(
                f"denoiser.weights: {self.weights} is neither a save_pretrained directory nor a .safetensors file "
                "(pickled .bin / .ckpt files are not read)"
            )
        state: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                state.update(load_file(path))
            except (OSError, RuntimeError, ValueError) as exc:
                raise FundiffError(f"denoiser.weights: {path} is not a readable safetensors file ({exc})") from None
        result = unet.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise FundiffError(
                f"denoiser.weights: {self.weights} does not fit the config (missing {result.missing_keys[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}); weights saved by an older diffusers may need loading and re-saving with "
                "the installed one"
            )
        return unet

    def build(self, context: BuildContext) -> nn.Module:
        config = self.unet_config()
        unet = _unet_class()(**config)
        # on the meta device (the trainer's memory estimate) there is nothing to load into
        if self.weights is not None and not any(p.is_meta for p in unet.parameters()):
            unet = self._load_weights(unet)
        schedule = context.components["schedule"]
        classes = context.spec.num_classes if self._labels_used(config, context.spec) else 0
        return DiffusersUNetModel(unet, schedule, self.train_timesteps(schedule, config), classes)


@hookimpl
def fundiff_register_denoisers(register):
    register("diffusers-unet", DiffusersUNet)
