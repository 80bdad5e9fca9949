"""Hook specifications: the contract between fundiff and its plugins.

A plugin is a module exposed under the entry-point group ``fundiff`` of an installed
distribution::

    [project.entry-points.fundiff]
    my-schedule = "fundiff_myplugin.schedule"

It implements one or more of the hooks below with ``@fundiff.hookimpl``. Every hook is a
*registration* hook: it receives a ``register(name, component_class)`` callback and calls
it once per component. Hooks run once, when the registry is built; the training and
sampling loops never call a hook. Names are lower-case words joined by hyphens
(``dpmpp-2m``); a name two plugins both register must be qualified in recipes as
``DISTRIBUTION:NAME`` or ``PLUGIN:NAME``.

``component_class`` must be a frozen attrs class (its fields are the recipe parameters,
with defaults and ``metadata={"doc": ...}``) subclassing the kind's base class from
:mod:`fundiff.components`. The registry checks both and reports a plugin that breaks the
contract as broken, without affecting other plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .components import Component

    Register = Callable[[str, type[Component]], None]

PROJECT = "fundiff"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@hookspec
def fundiff_register_data(register: "Register") -> None:
    """Register data sets.

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.DataSet` implementing ``spec() -> DataSpec`` and ``load() -> Data``.
        Data must be shipped with the package or generated; nothing is downloaded.

    Example::

        @hookimpl
        def fundiff_register_data(register):
            register("spiral", Spiral)
    """


# --------------------------------------------------------------------------------------
# Forward process (survey section 3)
# --------------------------------------------------------------------------------------


@hookspec
def fundiff_register_schedules(register: "Register") -> None:
    """Register noise schedules (survey sec. 3.1.1).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Schedule`: ``logsnr(t)`` strictly decreasing on [0, 1],
        ``t_from_logsnr`` its inverse, ``t_min`` the smallest usable t. Discrete T-step
        schedules subclass :class:`fundiff.DiscreteSchedule` and implement ``betas()``.

    Example::

        @hookimpl
        def fundiff_register_schedules(register):
            register("cosine", Cosine)
    """


@hookspec
def fundiff_register_noises(register: "Register") -> None:
    """Register noise types (survey sec. 3.1.2).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Noise`: ``sample(stream, draw)`` returns a (batch, *shape) tensor of
        zero-mean, unit-variance noise drawn from the per-sample ``NoiseStream``. Declare
        ``provides = {"gaussian-noise"}`` only if the draws are standard Gaussian.

    Example::

        @hookimpl
        def fundiff_register_noises(register):
            register("gaussian", Gaussian)
    """


@hookspec
def fundiff_register_chains(register: "Register") -> None:
    """Register transition chains (survey sec. 3.2).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Chain`: ``alpha_sigma(logsnr)`` on tensors, ``level(logsnr)`` on host
        floats, ``perturb`` and ``prior``. Gaussian chains declare
        ``provides = {"gaussian-marginals"}``.

    Example::

        @hookimpl
        def fundiff_register_chains(register):
            register("vp", VariancePreserving)
    """


# --------------------------------------------------------------------------------------
# Reverse process (survey section 4)
# --------------------------------------------------------------------------------------


@hookspec
def fundiff_register_denoisers(register: "Register") -> None:
    """Register denoiser networks (survey sec. 4.1).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Denoiser` whose ``build(context)`` returns a ``torch.nn.Module`` with
        ``forward(x, logsnr, cond=None)`` returning a tensor shaped like ``x``.

    Example::

        @hookimpl
        def fundiff_register_denoisers(register):
            register("mlp", MLP)
    """


@hookspec
def fundiff_register_parameterizations(register: "Register") -> None:
    """Register parameterizations of the reverse mean (survey sec. 4.2).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Parameterization`: ``target``, ``to_x0``, its inverse ``from_x0``,
        and ``log_x0_mse_factor``. ``fundiff.testing.check_parameterization`` checks the
        round trips.

    Example::

        @hookimpl
        def fundiff_register_parameterizations(register):
            register("v", VPrediction)
    """


@hookspec
def fundiff_register_weightings(register: "Register") -> None:
    """Register loss weightings and training noise-level densities (survey sec. 4.3.2).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Weighting`: ``sample_logsnr(u, schedule)`` and
        ``log_x0_weight(logsnr, alpha, sigma)`` (the weight of the x0-MSE, in log).

    Example::

        @hookimpl
        def fundiff_register_weightings(register):
            register("min-snr", MinSNR)
    """


# --------------------------------------------------------------------------------------
# Sampling procedure (survey section 5)
# --------------------------------------------------------------------------------------


@hookspec
def fundiff_register_guidances(register: "Register") -> None:
    """Register guidance mechanisms (survey sec. 5.1).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Guidance`: ``denoise(predict, x, level, cond)`` and optionally
        ``training_condition(cond, u)``.

    Example::

        @hookimpl
        def fundiff_register_guidances(register):
            register("cfg", ClassifierFree)
    """


@hookspec
def fundiff_register_samplers(register: "Register") -> None:
    """Register samplers (survey sec. 5.2).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Sampler` (it inherits the ``steps`` parameter) implementing
        ``sample(denoise, x, levels, noise, callback)``. Coefficients are computed from the
        host-side ``Level`` objects; draw fresh noise with ``noise.sample(draw)``.

    Example::

        @hookimpl
        def fundiff_register_samplers(register):
            register("ddim", DDIM)
    """


@hookspec
def fundiff_register_spacings(register: "Register") -> None:
    """Register step selections: which noise levels samplers visit (survey sec. 5.2.3).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.Spacing` implementing ``levels(schedule, chain, steps)``, which
        returns ``steps + 1`` host-side ``Level`` objects from the noisiest to the clean one.
        A recipe uses it through its optional ``spacing`` section; it applies to every
        sampler.

    Example::

        @hookimpl
        def fundiff_register_spacings(register):
            register("karras", Karras)
    """


@hookspec
def fundiff_register_variances(register: "Register") -> None:
    """Register reverse variances: the variance of p(x_s | x_t) in ancestral steps (survey sec. 4.3.1).

    :param register: call ``register(name, cls)`` with ``cls`` a subclass of
        :class:`fundiff.ReverseVariance` implementing ``variance(s, t, v)`` (a float, or a
        tensor shaped like x when it reads the network's learned-variance output ``v``;
        set ``needs_network = True`` then). Optionally ``prepare(pipeline, cache_dir)``
        estimates something from the model before sampling, and ``training_levels`` /
        ``training_loss`` add a term to the training loss. A recipe uses it through its
        optional ``variance`` section; without one, samplers keep their own variance.

    Example::

        @hookimpl
        def fundiff_register_variances(register):
            register("fixed-large", FixedLarge)
    """


#: hook name -> component kind it registers
HOOK_KINDS: dict[str, str] = {
    "fundiff_register_data": "data",
    "fundiff_register_schedules": "schedule",
    "fundiff_register_noises": "noise",
    "fundiff_register_chains": "chain",
    "fundiff_register_denoisers": "denoiser",
    "fundiff_register_parameterizations": "parameterization",
    "fundiff_register_weightings": "weighting",
    "fundiff_register_guidances": "guidance",
    "fundiff_register_samplers": "sampler",
    "fundiff_register_spacings": "spacing",
    "fundiff_register_variances": "variance",
}
