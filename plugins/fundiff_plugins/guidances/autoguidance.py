"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
itself", eq. 1 and sec. 3): guide the recipe's model D_1 with a weaker model D_0 of the same
task (smaller, or trained for fewer steps), both under the same condition:

    x0_auto = x0_bad + w (x0_good - x0_bad)  =  x0_good + (w - 1) (x0_good - x0_bad)

w = 1 is the good model alone (the brief's "good + w' (good - bad)" is this with w' = w - 1).
Unlike CFG the two models make the same kind of error, so the difference points away from
the good model's remaining errors instead of towards the class (the paper's sec. 3
argument), and it also works for unconditional models.

The weaker model is another fundiff run of the same data, named by ``run_dir`` and loaded
with :func:`fundiff.load_run` on the first evaluation (cached while its checkpoint is
unchanged); it receives the condition only if it is itself conditional.
"""

from __future__ import annotations

import functools
import os

import attrs
import torch

from fundiff import FundiffError, Guidance, hookimpl
from fundiff.config import doc

_RECIPE_FILE = "recipe.yaml"
_CHECKPOINT_FILE = "checkpoint.safetensors"


@functools.lru_cache(maxsize=4)
def _load_bad(run_dir: str, mtime_ns: int, device: str, use_ema: bool):
    """(predict, uses_labels, shape) of the weaker run, on ``device``."""
    from fundiff.pipeline import load_run, make_predict

    pipeline = load_run(run_dir, device=device)
    model = pipeline.sampling_model(use_ema).eval().requires_grad_(False)
    return make_predict(model, pipeline.parameterization), pipeline.uses_labels, tuple(pipeline.spec.shape)


def load_bad_model(run_dir: str, device, use_ema: bool = True):
    """The weaker run's ``predict``, whether it takes labels, and its data shape (cached)."""
    path = os.path.realpath(run_dir)
    return _load_bad(path, os.stat(os.path.join(path, _CHECKPOINT_FILE)).st_mtime_ns, str(device), use_ema)


@attrs.frozen(kw_only=True)
class Autoguidance(Guidance):
    """Guide the recipe's model with a weaker run of the same data: x0_bad + w (x0_good - x0_bad)."""

    run_dir: str = attrs.field(default="", metadata=doc("run directory of the weaker model (smaller or less trained, same data)"))
    scale: float = attrs.field(default=2.0, metadata=doc("w: 1 = the good model alone"))
    use_ema: bool = attrs.field(default=True, metadata=doc("use the weaker run's EMA weights when it has them"))

    def check_recipe(self, components):
        if not self.run_dir:
            return [
                "guidance 'autoguidance' needs run_dir: the run directory of a weaker model of the same data "
                "(train one with fewer steps or a smaller denoiser: fundiff train RECIPE --run-dir DIR)"
            ]
        if not os.path.isdir(self.run_dir):
            return [f"guidance 'autoguidance': run_dir {self.run_dir} not found; train the weaker model with: fundiff train RECIPE --run-dir {self.run_dir}"]
        missing = [name for name in (_RECIPE_FILE, _CHECKPOINT_FILE) if not os.path.isfile(os.path.join(self.run_dir, name))]
        if missing:
            return [f"guidance 'autoguidance': {self.run_dir} is not a trained fundiff run (no {' or '.join(missing)}); train it first"]
        return []

    def denoise(self, predict, x, level, cond):
        bad_predict, bad_uses_labels, shape = load_bad_model(self.run_dir, x.device, self.use_ema)
        if shape != tuple(x.shape[1:]):
            raise FundiffError(
                f"guidance 'autoguidance': the run in {self.run_dir} models data of shape {shape}, but this one samples "
                f"{tuple(x.shape[1:])}; the weaker model must be trained on the same data"
            )
        x0_good = predict(x, level, cond)
        x0_bad = bad_predict(x, level, cond if bad_uses_labels else None)
        return torch.lerp(x0_bad.to(x0_good.dtype), x0_good, self.scale)


@hookimpl
def fundiff_register_guidances(register):
    register("autoguidance", Autoguidance)
