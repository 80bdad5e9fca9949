"""``fundiff new-plugin``: scaffold a ready plugin distribution ``fundiff-NAME``.

The generated project is what a plugin author starts from, in the style of a cookiecutter
template::

    fundiff-NAME/
      pyproject.toml              one entry point per component (entry name = registry name)
      README.md
      src/fundiff_NAME/__init__.py
      src/fundiff_NAME/KIND.py    one module per requested kind: a small working component
      tests/recipe.yaml           a tiny recipe that uses the package's components
      tests/test_fundiff_NAME.py  fundiff.testing.check_component on every component, and the recipe

The example components are written for this template (they name no built-in design); the
other sections of the tiny recipe are chosen from the registry at generation time by a
generic search: each kind's registered components in order (closed-form denoisers first,
so the recipe needs little training), repaired section by section until ``load_recipe``
accepts the recipe with the new components registered in-process.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import string
import sys
from typing import Optional, Sequence

import yaml

from .components import KINDS, OPTIONAL_KINDS
from .errors import FundiffError, RecipeError, suggest

# ------------------------------------------------------------------------------ templates
# string.Template: $pkg (import name), $dist (distribution), $prefix (class-name prefix),
# $name (the plugin name), $cname (this component's registry name). Literal dollars: $$.

_HEADER = '''"""$summary

$body
"""

from __future__ import annotations

'''

TEMPLATES: dict[str, dict[str, str]] = {}

TEMPLATES["data"] = dict(
    summary="The ``$cname`` data set: points on a noisy ring in the plane.",
    body="""n points at angles evenly spaced around a circle of the given radius, each moved by
Gaussian jitter of standard deviation ``std``. The points come from a torch.Generator seeded
with ``seed``, so ``load()`` is deterministic for fixed parameters (no download).""",
    code='''import math

import attrs
import torch

import fundiff
from fundiff.config import at_least, doc, greater_than


@attrs.frozen(kw_only=True)
class ${prefix}Data(fundiff.DataSet):
    """Points on a ring of radius `radius` with Gaussian jitter (2-D, unlabelled)."""

    n: int = attrs.field(default=2000, validator=at_least(1), metadata=doc("number of points"))
    radius: float = attrs.field(default=1.5, validator=greater_than(0.0), metadata=doc("radius of the ring"))
    std: float = attrs.field(default=0.1, validator=at_least(0.0), metadata=doc("standard deviation of the jitter"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the jitter"))

    def spec(self) -> fundiff.DataSpec:
        return fundiff.DataSpec(shape=(2,))

    def load(self) -> fundiff.Data:
        generator = torch.Generator().manual_seed(self.seed)
        angle = torch.arange(self.n, dtype=torch.float64) * (2.0 * math.pi / self.n)
        ring = self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        x = ring + self.std * torch.randn(self.n, 2, generator=generator, dtype=torch.float64)
        return fundiff.Data(x=x.float(), spec=self.spec())


@fundiff.hookimpl
def fundiff_register_data(register):
    register("$cname", ${prefix}Data)
''',
)

TEMPLATES["schedule"] = dict(
    summary="The ``$cname`` schedule: logSNR falls from ``start`` to ``end`` along an exponential bend in t.",
    body="""    lambda(t) = start + (end - start) * expm1(k t) / expm1(k),    k = ``bend`` > 0

q(t) = expm1(k t) / expm1(k) rises from 0 to 1 with slope k e^{k t} / expm1(k) > 0, so lambda
is strictly decreasing; a larger k keeps logSNR near ``start`` (little noise) for longer.
The inverse is closed-form: with u = (start - lambda) / (start - end) clamped to [0, 1],

    t = log1p(u expm1(k)) / k.""",
    code='''import attrs
import torch

import fundiff
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class ${prefix}Schedule(fundiff.Schedule):
    """logSNR from `start` to `end` along expm1(k t) / expm1(k) (closed-form inverse)."""

    start: float = attrs.field(default=8.0, metadata=doc("logSNR at t = 0 (least noise)"))
    end: float = attrs.field(default=-8.0, metadata=doc("logSNR at t = 1 (most noise); below start"))
    bend: float = attrs.field(default=1.0, validator=greater_than(0.0), metadata=doc("k > 0: how long logSNR stays near start"))

    def __attrs_post_init__(self) -> None:
        if not self.end < self.start:
            raise ValueError(f"end ({self.end}) must be below start ({self.start}): logSNR must fall with t")

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        k = torch.tensor(self.bend, dtype=torch.float64)
        return self.start + (self.end - self.start) * torch.expm1(k * t) / torch.expm1(k)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        k = torch.tensor(self.bend, dtype=torch.float64)
        u = ((self.start - logsnr) / (self.start - self.end)).clamp(0.0, 1.0)
        return torch.log1p(u * torch.expm1(k)) / k


@fundiff.hookimpl
def fundiff_register_schedules(register):
    register("$cname", ${prefix}Schedule)
''',
)

TEMPLATES["noise"] = dict(
    summary="The ``$cname`` noise type: uniform noise with zero mean and unit variance.",
    body="""Each element is uniform on [-sqrt(3), sqrt(3)] (variance 3 / 3 = 1), drawn from the per-sample
stream, so sample i's noise does not depend on its batch. The noise is additive but not
Gaussian: it provides ``additive-noise`` and not ``gaussian-noise``, so recipes whose
components need Gaussian noise refuse it at load time.""",
    code='''import math

import attrs
import torch

import fundiff
from fundiff.components import ADDITIVE_NOISE


@attrs.frozen(kw_only=True)
class ${prefix}Noise(fundiff.Noise):
    """Uniform noise on [-sqrt(3), sqrt(3)]: zero mean, unit variance, additive."""

    provides = frozenset({ADDITIVE_NOISE})

    def sample(self, stream: fundiff.NoiseStream, draw: int) -> torch.Tensor:
        return (2.0 * stream.uniform(draw) - 1.0) * math.sqrt(3.0)


@fundiff.hookimpl
def fundiff_register_noises(register):
    register("$cname", ${prefix}Noise)
''',
)

TEMPLATES["chain"] = dict(
    summary="The ``$cname`` chain: a variance-preserving Gaussian chain written out in full.",
    body="""x_t = alpha x0 + sigma eps with alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda), so
alpha^2 + sigma^2 = 1 and alpha^2 / sigma^2 = exp(lambda). The host-side ``level`` uses the
same formulas in Python floats; lambda = +inf is the clean level (alpha 1, sigma 0). The prior
at the terminal level is the standard normal noise itself.""",
    code='''import math

import attrs
import torch

import fundiff
from fundiff.components import GAUSSIAN_MARGINALS


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@attrs.frozen(kw_only=True)
class ${prefix}Chain(fundiff.Chain):
    """Variance-preserving Gaussian chain: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def level(self, logsnr: float) -> fundiff.Level:
        logsnr = float(logsnr)
        return fundiff.Level(logsnr=logsnr, alpha=math.sqrt(_sigmoid(logsnr)), sigma=math.sqrt(_sigmoid(-logsnr)))

    def prior(self, level: fundiff.Level, noise: torch.Tensor) -> torch.Tensor:
        return noise


@fundiff.hookimpl
def fundiff_register_chains(register):
    register("$cname", ${prefix}Chain)
''',
)

TEMPLATES["denoiser"] = dict(
    summary="The ``$cname`` denoiser: a small MLP for low-dimensional data.",
    body="""The flattened noisy input is concatenated with Fourier features of the logSNR,
[cos(w_j lambda), sin(w_j lambda)] for frequencies w_j = 2^-j (lambda clamped to [-20, 20],
so the clean and the pure-noise levels embed as finite numbers), and passed through
``depth`` hidden layers of width ``width`` with SiLU activations. Class labels, when given,
are ignored: the denoiser is unconditional.""",
    code='''import attrs
import torch
from torch import nn

import fundiff
from fundiff.config import at_least, doc


class _Network(nn.Module):
    def __init__(self, numel: int, width: int, depth: int, features: int):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** -torch.arange(features, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        size = numel + 2 * features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, numel))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond=None) -> torch.Tensor:
        angles = logsnr.to(x.dtype).clamp(-20.0, 20.0)[:, None] * self.freqs.to(x.dtype)[None, :]
        h = torch.cat([x.reshape(x.shape[0], -1), angles.cos(), angles.sin()], dim=1)
        return self.net(h).reshape(x.shape)


@attrs.frozen(kw_only=True)
class ${prefix}Denoiser(fundiff.Denoiser):
    """MLP on the flattened input and Fourier features of logSNR (unconditional)."""

    width: int = attrs.field(default=64, validator=at_least(1), metadata=doc("hidden width"))
    depth: int = attrs.field(default=2, validator=at_least(1), metadata=doc("hidden layers"))
    features: int = attrs.field(default=8, validator=at_least(1), metadata=doc("logSNR frequencies 2^0 .. 2^-(features-1)"))

    def build(self, context: fundiff.BuildContext) -> nn.Module:
        return _Network(context.spec.numel, self.width, self.depth, self.features)


@fundiff.hookimpl
def fundiff_register_denoisers(register):
    register("$cname", ${prefix}Denoiser)
''',
)

TEMPLATES["parameterization"] = dict(
    summary="The ``$cname`` parameterization: the network predicts x0 from a variance-normalised input.",
    body="""The network sees c_in x_t with c_in = 1 / sqrt(alpha^2 + sigma^2) (unit variance for
unit-variance data on any Gaussian chain) and predicts x0 itself: target = x0, to_x0 and
from_x0 are the identity, and the MSE of the output is the x0 MSE (log factor 0).""",
    code='''import attrs
import torch

import fundiff


@attrs.frozen(kw_only=True)
class ${prefix}Parameterization(fundiff.Parameterization):
    """Predict x0 from x_t / sqrt(alpha^2 + sigma^2)."""

    def input_scale(self, alpha, sigma):
        return torch.rsqrt(torch.as_tensor(alpha) ** 2 + torch.as_tensor(sigma) ** 2)

    def target(self, x0, eps, x_t, alpha, sigma):
        return x0

    def to_x0(self, out, x_t, alpha, sigma):
        return out

    def from_x0(self, x0, x_t, alpha, sigma):
        return x0

    def log_x0_mse_factor(self, alpha, sigma):
        return torch.zeros_like(torch.as_tensor(alpha, dtype=torch.float64))


@fundiff.hookimpl
def fundiff_register_parameterizations(register):
    register("$cname", ${prefix}Parameterization)
''',
)

TEMPLATES["weighting"] = dict(
    summary="The ``$cname`` weighting: t uniform on [t_min, 1], x0-MSE weight SNR softly capped.",
    body="""Training levels: lambda(t) with t = t_min + u (1 - t_min), uniform in the schedule's time.
Loss weight in x0 units: w(lambda) = SNR / (1 + SNR / c), i.e. log w = lambda - softplus(lambda
- log c): the eps-MSE weight (w = SNR) at high noise, capped smoothly at c = ``cap`` at low
noise, where the eps loss would otherwise dominate.""",
    code='''import math

import attrs
import torch

import fundiff
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class ${prefix}Weighting(fundiff.Weighting):
    """t uniform; x0-MSE weight SNR / (1 + SNR / cap)."""

    cap: float = attrs.field(default=5.0, validator=greater_than(0.0), metadata=doc("the weight's limit at low noise"))

    def sample_logsnr(self, u: torch.Tensor, schedule: fundiff.Schedule) -> torch.Tensor:
        t_min = float(schedule.t_min)
        return schedule.logsnr(t_min + u.to(torch.float64) * (1.0 - t_min))

    def log_x0_weight(self, logsnr, alpha, sigma):
        logsnr = torch.as_tensor(logsnr)
        # logaddexp(0, x) is softplus without torch's linear threshold
        return logsnr - torch.logaddexp(torch.zeros_like(logsnr), logsnr - math.log(self.cap))


@fundiff.hookimpl
def fundiff_register_weightings(register):
    register("$cname", ${prefix}Weighting)
''',
)

TEMPLATES["guidance"] = dict(
    summary="The ``$cname`` guidance: the model's x0 estimate, clipped to [-clip, clip].",
    body="""Static thresholding of the x0 estimate: every element of predict(x, level, cond) is clamped
to [-clip, clip] before the sampler uses it, which keeps early, unreliable estimates inside
the data's range. The condition is passed through unchanged, so the guidance works with
conditional and unconditional denoisers; nothing changes in training.""",
    code='''import attrs

import fundiff
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class ${prefix}Guidance(fundiff.Guidance):
    """The x0 estimate clamped elementwise to [-clip, clip]."""

    clip: float = attrs.field(default=4.0, validator=greater_than(0.0), metadata=doc("bound of the x0 estimate's elements"))

    def denoise(self, predict, x, level, cond):
        return predict(x, level, cond).clamp(-self.clip, self.clip)


@fundiff.hookimpl
def fundiff_register_guidances(register):
    register("$cname", ${prefix}Guidance)
''',
)

TEMPLATES["spacing"] = dict(
    summary="The ``$cname`` spacing: times t_i = t_min + (1 - t_min) (1 - i / steps)^p, then the clean level.",
    body="""For i = 0 .. steps - 1 the times fall from t = 1 (the noisiest level) towards t_min; p =
``power`` > 1 puts more steps near t_min (low noise), p = 1 is evenly spaced in t. The levels
are the chain's at lambda(t_i), strictly less noisy one after the other, and the last level is
clean.""",
    code='''import math

import attrs
import torch

import fundiff
from fundiff.config import at_least, doc


@attrs.frozen(kw_only=True)
class ${prefix}Spacing(fundiff.Spacing):
    """t_i = t_min + (1 - t_min) (1 - i / steps)^power, then the clean level."""

    power: float = attrs.field(default=2.0, validator=at_least(1.0), metadata=doc("p >= 1: larger puts more steps at low noise"))

    def levels(self, schedule, chain, steps):
        t_min = float(schedule.t_min)
        ts = [t_min + (1.0 - t_min) * (1.0 - i / steps) ** self.power for i in range(steps)]
        logsnrs = schedule.logsnr(torch.tensor(ts, dtype=torch.float64)).tolist()
        return [chain.level(float(lam)) for lam in logsnrs] + [chain.level(math.inf)]


@fundiff.hookimpl
def fundiff_register_spacings(register):
    register("$cname", ${prefix}Spacing)
''',
)

TEMPLATES["sampler"] = dict(
    summary="The ``$cname`` sampler: deterministic steps that keep the current noise direction.",
    body="""From level t to the less noisy level s, with x0 the denoiser's estimate at t, the implied
noise is eps = (x_t - alpha_t x0) / sigma_t, and the step moves to the same noise direction at
level s:

    x_s = alpha_s x0 + sigma_s eps.

This is deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0), written for any Gaussian
chain; on the clean level (sigma_s = 0) it returns x0. One denoiser call per step.""",
    code='''import attrs

import fundiff
from fundiff.components import GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class ${prefix}Sampler(fundiff.Sampler):
    """x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t (deterministic, first order)."""

    requires = frozenset({GAUSSIAN_MARGINALS})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]  # host floats: no device sync in the loop
            x0 = denoise(x, t)
            eps = (x - t.alpha * x0) / t.sigma
            x = s.alpha * x0 + s.sigma * eps if s.sigma > 0 else x0
            if callback is not None:
                callback(i, x, x0)
        return x


@fundiff.hookimpl
def fundiff_register_samplers(register):
    register("$cname", ${prefix}Sampler)
''',
)

TEMPLATES["variance"] = dict(
    summary="The ``$cname`` reverse variance: the geometric mean of the posterior and forward variances.",
    body="""For a step from level t to the less noisy level s, the two classical choices are the
posterior variance beta_tilde (DDPM's "fixed small") and the forward transition variance beta
("fixed large"); this component returns their geometric mean sqrt(beta_tilde * beta), which
lies between them. It needs nothing from the network.""",
    code='''import math

import attrs

import fundiff
from fundiff import noiselevel


@attrs.frozen(kw_only=True)
class ${prefix}Variance(fundiff.ReverseVariance):
    """sqrt(beta_tilde * beta): between the posterior and the forward transition variance."""

    def variance(self, s, t, v):
        small = noiselevel.posterior(s, t)[2]  # beta tilde, host floats
        large = noiselevel.transition(s, t)[1]  # beta
        return math.sqrt(small * large)


@fundiff.hookimpl
def fundiff_register_variances(register):
    register("$cname", ${prefix}Variance)
''',
)

assert set(TEMPLATES) == set(KINDS), "every component kind needs a template"

PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "fundiff plugin $name: $kinds."
readme = "README.md"
requires-python = ">=3.10"
license = "MIT"
dependencies = ["fundiff>=0.1"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# One entry point per component module; the entry-point name is the registry name.
[project.entry-points.fundiff]
$entry_points

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

INIT = '''"""$dist: a fundiff plugin distribution.

One module per component, each its own entry point of the ``fundiff`` group:

$listing
"""

__version__ = "0.1.0"
'''

README = """# $dist

A [fundiff](https://pypi.org/project/fundiff/) plugin with these components:

| kind | name | module |
|---|---|---|
$rows

Generated by `fundiff new-plugin $name`; each module holds a small working example to
replace with your design.

## Develop

    pip install -e '.[test]'
    pytest
    fundiff plugins            # lists the components above
    fundiff show KIND/NAME     # their parameters

The tests run `fundiff.testing.check_component` on every component (the conformance
contract of its kind) and sample `tests/recipe.yaml`, a tiny recipe that uses them.

## Publish

    python -m build && twine upload dist/*

Users then `pip install $dist` and name the components in their recipes.
"""

TEST = '''"""Tests of $dist: every component passes fundiff's conformance kit, and a tiny recipe
that uses them trains and samples. Run after installing: pip install -e '.[test]' && pytest"""

from __future__ import annotations

import pathlib

import pytest
import torch

import fundiff
from fundiff.testing import COVERED_KINDS, check_component

$imports

#: (kind, registry name, class) of every component of the package
COMPONENTS = [
$components
]
RECIPE = pathlib.Path(__file__).with_name("recipe.yaml")


@pytest.fixture(scope="module")
def registry():
    return fundiff.Registry.discover()


@pytest.mark.parametrize("kind, name, cls", COMPONENTS, ids=[c[1] for c in COMPONENTS])
def test_registered_from_this_distribution(registry, kind, name, cls):
    entry = registry.resolve(kind, name)
    assert entry.cls is cls and entry.distribution == "$dist"


@pytest.mark.parametrize("kind, name, cls", COMPONENTS, ids=[c[1] for c in COMPONENTS])
def test_conformance(kind, name, cls):
    """fundiff.testing's contract of the kind (kinds the kit has no check for: a smoke test)."""
    component = cls()
    if kind in COVERED_KINDS:
        check_component(kind, component)
    elif kind == "denoiser":
        spec = fundiff.DataSpec(shape=(2,))
        net = component.build(fundiff.BuildContext(spec=spec, components={}))
        x = torch.randn(5, 2)
        out = net(x, torch.linspace(-10.0, 10.0, 5))
        assert out.shape == x.shape and torch.isfinite(out).all()
    elif kind == "guidance":
        level = fundiff.Level(logsnr=0.0, alpha=0.5**0.5, sigma=0.5**0.5)
        x = torch.randn(5, 2, dtype=torch.float64)
        guided = component.start(None).denoise(lambda x_, level_, cond_: 0.5 * x_, x, level, None)
        assert guided.shape == x.shape and torch.isfinite(guided).all()


def test_recipe_trains_and_samples(registry, tmp_path):
    loaded = fundiff.load_recipe(RECIPE, registry)
    for kind, name, cls in COMPONENTS:
        assert type(loaded[kind]) is cls
    fundiff.train(loaded, tmp_path / "run", quiet=True)
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=64)
    assert samples.shape[0] == 64 and torch.isfinite(samples).all()
'''


# ------------------------------------------------------------------------------ generation


def _names(name: str) -> tuple[str, str, str]:
    """(distribution, import package, class prefix) for a plugin name."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise FundiffError(f"new-plugin {name!r}: write the name in lower case, words joined by hyphens (e.g. 'my-designs')")
    package = "fundiff_" + name.replace("-", "_")
    prefix = "".join(part.capitalize() for part in name.split("-"))
    if keyword.iskeyword(package) or not prefix.isidentifier():
        raise FundiffError(f"new-plugin {name!r}: the name does not give a valid Python identifier")
    return "fundiff-" + name, package, prefix


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The requested kinds, validated and de-duplicated in order (all kinds when empty)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise FundiffError(
            "; ".join(f"unknown kind {k!r}: {suggest(k, KINDS)}kinds: {', '.join(KINDS)}" for k in unknown)
        )
    chosen = list(dict.fromkeys(kinds)) or list(KINDS)
    return [k for k in KINDS if k in chosen]


def _component_name(name: str, kind: str) -> str:
    return f"{name}-{kind}"


def render(name: str, kinds: Sequence[str]) -> dict[str, str]:
    """The generated files (path relative to the project -> text), without tests/recipe.yaml."""
    dist, package, prefix = _names(name)
    kinds = check_kinds(kinds)
    files: dict[str, str] = {}
    for kind in kinds:
        template = TEMPLATES[kind]
        values = {"pkg": package, "dist": dist, "prefix": prefix, "name": name, "cname": _component_name(name, kind)}
        summary = string.Template(template["summary"]).substitute(values)
        body = string.Template(template["body"]).substitute(values)
        code = string.Template(template["code"]).substitute(values)
        files[f"src/{package}/{kind}.py"] = _HEADER.replace("$summary", summary).replace("$body", body) + code
    common = {"dist": dist, "name": name, "kinds": ", ".join(f"a {k}" for k in kinds)}
    files["pyproject.toml"] = string.Template(PYPROJECT).substitute(
        common, entry_points="\n".join(f'{_component_name(name, k)} = "{package}.{k}"' for k in kinds)
    )
    files[f"src/{package}/__init__.py"] = string.Template(INIT).substitute(
        common, listing="\n".join(f"* ``{k}``: the {k} ``{_component_name(name, k)}``" for k in kinds)
    )
    files["README.md"] = string.Template(README).substitute(
        common, rows="\n".join(f"| {k} | `{_component_name(name, k)}` | `{package}.{k}` |" for k in kinds)
    )
    files[f"tests/test_{package}.py"] = string.Template(TEST).substitute(
        common,
        imports="\n".join(f"from {package}.{k} import {prefix}{k.capitalize()}" for k in kinds),
        components="\n".join(f'    ("{k}", "{_component_name(name, k)}", {prefix}{k.capitalize()}),' for k in kinds),
    )
    return files


def _load_modules(root: str, package: str, kinds: Sequence[str]) -> list[tuple[str, object]]:
    """Import the generated modules from ``root/src`` without installing them (for the search)."""
    modules = []
    for kind in kinds:
        path = os.path.join(root, "src", package, f"{kind}.py")
        spec = importlib.util.spec_from_file_location(f"_fundiff_scaffold_{package}_{kind}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def _preference(entry) -> tuple:
    """Sort key of candidate companions, from metadata only: closed-form denoisers first (no
    training), then components that bring more capabilities and need fewer, then the
    smallest data (cheap to train on)."""
    cls = entry.cls
    size = 0
    if cls.kind == "data":
        try:
            size = cls().spec().numel
        except Exception:  # a data set without defaults for every parameter: last
            size = 1 << 60
    return (bool(getattr(cls, "trainable", True)), size, -len(cls.provides), len(cls.requires))


def companion_recipe(registry, own: dict[str, str]) -> dict:
    """A tiny recipe with the sections ``own`` (kind -> component name) and a registered
    component for every other kind the recipe needs, found by a generic repair search."""
    needed = [k for k in KINDS if k not in own and k not in OPTIONAL_KINDS]
    candidates: dict[str, list[str]] = {}
    for kind in needed:
        entries = sorted(registry.entries(kind), key=_preference)
        candidates[kind] = [e.name for e in entries]
        if not candidates[kind]:
            raise FundiffError(f"new-plugin: no registered {kind} to complete the example recipe; request --kind {kind} too")
    index = {kind: 0 for kind in needed}
    last: Optional[RecipeError] = None
    for attempt in range(400):
        recipe: dict = {kind: {"name": own[kind]} if kind in own else {"name": candidates[kind][index[kind]]} for kind in KINDS if kind in own or kind in needed}
        recipe["sampler"]["steps"] = 8
        recipe["train"] = {"steps": 30, "batch_size": 64, "checkpoint_every": 30, "log_every": 10}
        recipe["sample"] = {"num_samples": 64, "batch_size": 64, "seed": 0}
        try:
            from .recipe import load_recipe

            load_recipe(recipe, registry)
            return recipe
        except RecipeError as err:
            last = err
            blamed = [k for k in dict.fromkeys(p.split(".")[0] for p, _ in err.problems) if k in index]
            # a problem reported on one of our own sections is caused by a companion: try the next one
            movable = blamed or [needed[attempt % len(needed)]]
            for kind in movable:
                index[kind] = (index[kind] + 1) % len(candidates[kind])
    raise FundiffError(f"new-plugin: found no registered components that make a valid example recipe with these kinds; last refusal: {last}")


def new_plugin(name: str, kinds: Sequence[str] = (), directory: str = ".") -> str:
    """Write the project ``DIRECTORY/fundiff-NAME`` and return its path.

    Raises :class:`FundiffError` (nothing written) when the target exists, the name is not a
    valid plugin name or a kind is unknown.
    """
    dist, package, _ = _names(name)
    kinds = check_kinds(kinds)
    root = os.path.join(directory, dist)
    if os.path.exists(root):
        raise FundiffError(f"new-plugin: {root} already exists; nothing was written (choose another name or --dir)")
    files = render(name, kinds)
    import shutil
    import tempfile

    from .registry import Registry

    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{dist}-", dir=directory)
    try:
        for path, text in files.items():
            full = os.path.join(staging, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as handle:
                handle.write(text)
        modules = _load_modules(staging, package, kinds)
        registry = Registry.discover(plugins=[(_component_name(name, k), m) for k, m in zip(kinds, modules)])
        recipe = companion_recipe(registry, {k: _component_name(name, k) for k in kinds})
        header = f"# A tiny recipe using {dist}'s components; the other sections were chosen by `fundiff new-plugin`.\n"
        with open(os.path.join(staging, "tests", "recipe.yaml"), "w", encoding="utf-8") as handle:
            handle.write(header + yaml.safe_dump(recipe, sort_keys=False))
        if os.path.exists(root):
            raise FundiffError(f"new-plugin: {root} already exists; nothing was written")
        os.rename(staging, root)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
        for key in [k for k in sys.modules if k.startswith(f"_fundiff_scaffold_{package}_")]:
            del sys.modules[key]
    return root
