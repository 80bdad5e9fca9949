"""fundiff: a plugin-based engine for diffusion models.

Every design in the survey of diffusion-model design fundamentals (forward process,
reverse process, sampling procedure) is a component registered by a plugin; a YAML recipe
names one component of each kind. See docs/architecture.md.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import noiselevel, rng
from .components import (
    KINDS,
    BuildContext,
    Chain,
    Component,
    Data,
    DataSet,
    DataSpec,
    Denoiser,
    DiscreteSchedule,
    Guidance,
    LevelTensors,
    Noise,
    Parameterization,
    ReverseVariance,
    Sampler,
    Schedule,
    Spacing,
    TrainingBatch,
    Weighting,
)
from .errors import FundiffError, PluginError, RecipeError
from .hookspecs import hookimpl
from .noiselevel import Level
from .recipe import Recipe, SampleConfig, TrainConfig, load_recipe
from .registry import Registry
from .rng import NoiseStream

try:
    __version__ = _version("fundiff")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str):
    # heavier modules (training, sampling, I/O) load on first use
    if name in ("Pipeline", "train", "sample", "load_run", "noise_levels", "make_denoise"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fundiff' has no attribute {name!r}")


__all__ = [
    "KINDS",
    "BuildContext",
    "Chain",
    "Component",
    "Data",
    "DataSet",
    "DataSpec",
    "Denoiser",
    "DiscreteSchedule",
    "FundiffError",
    "Guidance",
    "Level",
    "LevelTensors",
    "Noise",
    "NoiseStream",
    "Parameterization",
    "Pipeline",
    "PluginError",
    "Recipe",
    "RecipeError",
    "Registry",
    "ReverseVariance",
    "SampleConfig",
    "Sampler",
    "Schedule",
    "Spacing",
    "TrainConfig",
    "TrainingBatch",
    "Weighting",
    "hookimpl",
    "load_recipe",
    "load_run",
    "make_denoise",
    "noise_levels",
    "noiselevel",
    "rng",
    "sample",
    "train",
]
