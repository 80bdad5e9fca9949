"""Every registered component of every kind that fundiff.testing covers passes its
conformance check, built with its default parameters; the checks that take a partner
component (weightings with schedules, parameterizations and samplers with chains) run on
every registered partner too."""

from __future__ import annotations

import pytest

import fundiff
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.testing import COVERED_KINDS, check_component
from helpers import kit_pairs

_REGISTRY = fundiff.Registry.discover()
PARTNERS = {"weighting": "schedule", "parameterization": "chain", "sampler": "chain"}
#: what registered chains provide: the kinds of state a component may require of its chain
CHAIN_CAPABILITIES = frozenset().union(*(e.cls.provides for e in _REGISTRY.entries("chain")))


def _checkable(kind: str, name: str, partner: str | None) -> bool:
    """Components that need a chain are checked with the chains whose state they fit
    (helpers.kit_pairs); without a partner, with the kit's own Gaussian chain, only when they
    require no other kind of state."""
    if PARTNERS.get(kind) != "chain":
        return True
    cls = _REGISTRY.resolve(kind, name).cls
    if partner is None:
        return cls.requires & CHAIN_CAPABILITIES <= {GAUSSIAN_MARGINALS}
    return kit_pairs(cls, _REGISTRY.resolve("chain", partner).cls, CHAIN_CAPABILITIES)


COMPONENTS = [(kind, name) for kind in COVERED_KINDS for name in _REGISTRY.names(kind) if _checkable(kind, name, None)]
PAIRED = [
    (kind, name, partner)
    for kind, partner_kind in PARTNERS.items()
    for name in _REGISTRY.names(kind)
    for partner in _REGISTRY.names(partner_kind)
    if partner_kind != "chain" or _checkable(kind, name, partner)
]


def test_registry_has_components_of_every_covered_kind():
    """The parametrisation below is not empty for any covered kind (a broken plugin would
    silently drop its components)."""
    assert not _REGISTRY.broken, [p.error for p in _REGISTRY.broken]
    for kind in COVERED_KINDS:
        assert _REGISTRY.names(kind), f"no registered {kind}"


@pytest.mark.parametrize("kind, name", COMPONENTS, ids=[f"{k}/{n}" for k, n in COMPONENTS])
def test_component_conforms(registry, kind, name, tmp_path):
    """check_component(kind, component) with default parameters (plus the required ones of
    components that have some, from REQUIRED_EXAMPLES)."""
    params = REQUIRED_EXAMPLES[(kind, name)](tmp_path) if (kind, name) in REQUIRED_EXAMPLES else {}
    check_component(kind, registry.build(kind, name, **params))


def _points_file(tmp_path) -> dict:
    import numpy as np

    path = tmp_path / "points.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32))
    return {"path": str(path)}


#: parameters without defaults, for the components that have them
REQUIRED_EXAMPLES = {("data", "tensor-file"): _points_file}


@pytest.mark.parametrize("kind, name, partner", PAIRED, ids=[f"{k}/{n}+{p}" for k, n, p in PAIRED])
def test_component_conforms_with_each_partner(registry, kind, name, partner):
    """check_component with each registered partner: weightings against every schedule,
    parameterizations and samplers against every chain."""
    partner_kind = PARTNERS[kind]
    check_component(kind, registry.build(kind, name), **{partner_kind: registry.build(partner_kind, partner)})


def test_check_component_refuses_unknown_and_mismatched_kinds(registry):
    """check_component names the problem: an unknown kind, a kind without a check, or a
    component of another kind."""
    with pytest.raises(ValueError, match="unknown component kind"):
        check_component("scheduler", object())
    uncovered = [k for k in fundiff.KINDS if k not in COVERED_KINDS]
    if uncovered:
        with pytest.raises(ValueError, match="no check"):
            check_component(uncovered[0], object())
    schedule = registry.build("schedule", _REGISTRY.names("schedule")[0])
    with pytest.raises(AssertionError, match="is not a fundiff.Chain"):
        check_component("chain", schedule)
