"""Recipes: one YAML file naming a component of each kind, plus training and sampling options.

::

    data:             {name: two-moons, n: 20000}
    chain:            {name: vp}
    schedule:         {name: cosine}
    noise:            {name: gaussian}
    denoiser:         {name: mlp, width: 256, depth: 4}
    parameterization: {name: v}
    weighting:        {name: eps-mse}
    guidance:         {name: none}
    sampler:          {name: ddim, steps: 20, eta: 0.0}
    train:            {steps: 3000, batch_size: 512, lr: 1.0e-3, ema: 0.999, seed: 0}
    sample:           {num_samples: 2000, seed: 0}

A component section may also be just its name (``sampler: ddim``). Loading reads YAML with
``yaml.safe_load`` only, resolves every name against the registry, structures each
section into the component's own attrs class, and checks that every component's
``requires`` is provided by another. All problems are reported together, each with its
path. :meth:`Recipe.to_dict` is the resolved recipe (every default filled in); loading it
again gives an equal recipe.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal, Mapping, Optional, Union

import attrs
import yaml

from .components import KINDS, OPTIONAL_KINDS, Component
from .config import at_least, doc, in_range, structure, unstructure
from .errors import FundiffError, RecipeError, suggest
from .registry import ComponentEntry, Registry


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Options of the training loop."""

    steps: int = attrs.field(default=2000, validator=at_least(0), metadata=doc("optimizer steps in total"))
    batch_size: int = attrs.field(default=256, validator=at_least(1), metadata=doc("examples per step"))
    lr: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0, low_open=True), metadata=doc("AdamW learning rate"))
    weight_decay: float = attrs.field(default=0.0, validator=at_least(0.0), metadata=doc("AdamW weight decay"))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), metadata=doc("AdamW betas"))
    warmup: int = attrs.field(default=0, validator=at_least(0), metadata=doc("linear learning-rate warm-up steps"))
    ema: float = attrs.field(
        default=0.999, validator=in_range(0.0, 1.0, high_open=True), metadata=doc("EMA decay of the weights (0: off)")
    )
    grad_clip: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("max gradient norm (0: off)"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of initialisation, data order and noise"))
    checkpoint_every: int = attrs.field(default=500, validator=at_least(1), metadata=doc("steps between checkpoints"))
    log_every: int = attrs.field(default=50, validator=at_least(1), metadata=doc("steps between metric lines"))
    device: str = attrs.field(default="cpu", metadata=doc("torch device to train on, e.g. 'cpu' or 'cuda'"))
    precision: Literal["fp32", "bf16", "fp16"] = attrs.field(
        default="fp32", metadata=doc("autocast precision of the denoiser (schedule math stays float64)")
    )
    on_nonfinite: Literal["stop", "skip"] = attrs.field(
        default="stop",
        metadata=doc("a NaN/Inf loss or gradient: stop (naming step, component and noise level) or skip the batch"),
    )
    parallel: Literal["ddp", "fsdp"] = attrs.field(
        default="ddp",
        metadata=doc(
            "under torchrun: ddp (every rank holds the whole model) or fsdp (weights, gradients, AdamW state and EMA "
            "sharded across ranks; docs/scaling.md); no effect in one process"
        ),
    )


@attrs.frozen(kw_only=True)
class SampleConfig:
    """Options of ``fundiff sample`` (each overridable on the command line)."""

    num_samples: int = attrs.field(default=1000, validator=at_least(1), metadata=doc("samples to draw"))
    batch_size: int = attrs.field(default=1000, validator=at_least(1), metadata=doc("samples per forward pass"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the per-sample noise streams"))
    use_ema: bool = attrs.field(default=True, metadata=doc("sample with the EMA weights"))
    label: Optional[int] = attrs.field(
        default=None,
        validator=at_least(0),
        metadata=doc("class label for conditional denoisers (default: drawn from the data's label frequencies)"),
    )
    format: Literal["safetensors", "npz"] = attrs.field(default="safetensors", metadata=doc("file format of the samples"))
    device: str = attrs.field(default="cpu", metadata=doc("torch device to sample on"))
    precision: Literal["fp32", "bf16", "fp16"] = attrs.field(
        default="fp32", metadata=doc("autocast precision of the denoiser while sampling (the state stays float32)")
    )
    stop_logsnr: Optional[float] = attrs.field(
        default=None,
        metadata=doc("truncation: stop the sampler at this logSNR and return the denoiser's x0 estimate there (default: sample to clean data)"),
    )
    backend: Literal["auto", "torch", "triton"] = attrs.field(
        default="auto",
        metadata=doc(
            "fused sampling steps (docs/fused-steps.md): triton kernels on CUDA, torch the reference; "
            "auto = triton on CUDA when it imports, else torch"
        ),
    )
    cuda_graphs: bool = attrs.field(
        default=False,
        metadata=doc("capture the whole sampling loop (denoiser and steps) in a CUDA graph once per batch shape and replay it (CUDA only)"),
    )


OPTION_SECTIONS: dict[str, type] = {"train": TrainConfig, "sample": SampleConfig}
SECTIONS: tuple[str, ...] = KINDS + tuple(OPTION_SECTIONS)


@attrs.frozen
class Recipe:
    """A validated recipe: one component instance per kind and the run options."""

    components: dict[str, Component]
    entries: dict[str, ComponentEntry]
    names: dict[str, str]  # path ("sampler", "schedule.base") -> the name as written
    train: TrainConfig
    sample: SampleConfig
    source: Optional[str] = None

    def __getitem__(self, kind: str) -> Component:
        return self.components[kind]

    def get(self, kind: str) -> Optional[Component]:
        """The component of a kind, or None for an optional kind the recipe leaves out."""
        return self.components.get(kind)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every section with every parameter, defaults filled in."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            if kind in self.components:
                out[kind] = {"name": self.names[kind], **unstructure(self.components[kind], self.names, kind)}
        out["train"] = unstructure(self.train)
        out["sample"] = unstructure(self.sample)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def plugin_versions(self) -> dict[str, dict[str, Optional[str]]]:
        """For each kind: the component's plugin, distribution and version."""
        return {
            kind: {"name": e.name, "plugin": e.plugin, "distribution": e.distribution, "version": e.version}
            for kind, e in self.entries.items()
        }


def read_recipe_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a recipe file with ``yaml.safe_load``; errors name the file and the line."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FundiffError(f"recipe file not found: {path}; check the path (recipes ship in recipes/)") from None
    except OSError as exc:
        raise FundiffError(f"cannot read recipe file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FundiffError(
            f"{path}{where}: YAML tag not allowed: {exc.problem}; recipes are plain YAML "
            "(mappings, lists, numbers, strings) and never construct Python objects"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FundiffError(f"{path}{where}: malformed YAML: {problem}; fix the syntax and try again") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FundiffError(f"{path}: a recipe must be a YAML mapping of sections ({', '.join(SECTIONS)})")
    return data


def load_recipe(
    recipe: Union[str, os.PathLike, Mapping[str, Any]],
    registry: Optional[Registry] = None,
    *,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Recipe:
    """Load and validate a recipe from a YAML file path or a dict.

    :param overrides: dotted paths to values applied before validation, e.g.
        ``{"sampler.steps": 10, "sampler.name": "ddpm"}``.
    :raises RecipeError: listing every problem with its path.
    """
    registry = registry if registry is not None else Registry.discover()
    if isinstance(recipe, Mapping):
        source, data = None, copy.deepcopy(dict(recipe))
    else:
        source, data = os.fspath(recipe), read_recipe_file(recipe)
    if overrides:
        data = apply_overrides(data, overrides)
    return _validate(data, registry, source)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted paths (``section.key``) in a recipe dict; a component's new name drops
    the old component's parameters that the override did not set."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise RecipeError([(dotted, "an override must be SECTION.KEY=VALUE, e.g. sampler.steps=10")])
        current = data.get(section)
        if isinstance(current, str):
            current = {"name": current}
        if current is None:
            current = {}
        if not isinstance(current, dict):
            raise RecipeError([(section, f"must be a mapping, got {current!r}")])
        if key == "name" and section in KINDS and current.get("name") != value:
            current = {k: v for k, v in current.items() if f"{section}.{k}" in overrides}
        current[key] = value
        data[section] = current
    return data


def _validate(data: dict[str, Any], registry: Registry, source: Optional[str]) -> Recipe:
    problems: list[tuple[str, str]] = []
    for key in data:
        if key not in SECTIONS:
            problems.append((str(key), f"unknown section; {suggest(str(key), SECTIONS)}sections: {', '.join(SECTIONS)}"))

    components: dict[str, Component] = {}
    entries: dict[str, ComponentEntry] = {}
    names: dict[str, str] = {}
    for kind in KINDS:
        section = data.get(kind)
        if section is None and kind in OPTIONAL_KINDS:
            continue
        if section is None:
            known = ", ".join(registry.names(kind)) or "(none installed)"
            problems.append((kind, f"missing section; add '{kind}: {{name: ...}}' with one of: {known}"))
            continue
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, Mapping):
            problems.append((kind, f"must be a mapping with a 'name' key or a component name, got {section!r}"))
            continue
        name = section.get("name")
        if name is None:
            known = ", ".join(registry.names(kind)) or "(none installed)"
            problems.append((f"{kind}.name", f"missing; choose one of: {known}"))
            continue
        try:
            entry = registry.resolve(kind, name)
        except FundiffError as exc:
            problems.append((f"{kind}.name", str(exc)))
            continue
        params = {k: v for k, v in section.items() if k != "name"}
        try:
            components[kind] = structure(entry.cls, params, path=kind, registry=registry, names=names)
        except RecipeError as err:
            problems.extend(err.problems)
            continue
        entries[kind] = entry
        names[kind] = name

    options: dict[str, Any] = {}
    for section_name, cls in OPTION_SECTIONS.items():
        try:
            options[section_name] = structure(cls, data.get(section_name) or {}, path=section_name)
        except RecipeError as err:
            problems.extend(err.problems)

    if not problems:
        problems.extend(compatibility_problems(components, entries, registry))
    if problems:
        raise RecipeError(problems, source)
    return Recipe(components, entries, names, options["train"], options["sample"], source)


def compatibility_problems(
    components: Mapping[str, Component], entries: Mapping[str, ComponentEntry], registry: Registry
) -> list[tuple[str, str]]:
    """Every unmet ``requires`` and every ``check_recipe`` complaint, tied to its section."""
    problems: list[tuple[str, str]] = []
    provided: dict[str, list[str]] = {}
    for kind, component in components.items():
        for capability in type(component).provides:
            provided.setdefault(capability, []).append(f"{kind} '{entries[kind].name}'")
    for kind, component in components.items():
        for capability in sorted(type(component).requires):
            if capability in provided:
                continue
            providers = [
                f"{e.kind}/{e.name}" for k in KINDS for e in registry.entries(k) if capability in e.cls.provides
            ]
            fix = f"components that provide it: {', '.join(providers)}" if providers else "no installed component provides it"
            problems.append(
                (
                    kind,
                    f"{kind} '{entries[kind].name}' requires '{capability}', which no component of this recipe "
                    f"provides; {fix}",
                )
            )
    if problems:
        return problems
    for kind, component in components.items():
        for message in component.check_recipe(dict(components)):
            problems.append((kind, message))
    return problems
