"""Small shared helpers for the test-suite (statistics and recipe dicts)."""

from __future__ import annotations

import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equally sized point clouds (float64)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0)
    pa = (a.double() @ directions).sort(dim=0).values
    pb = (b.double() @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def oracle_recipe(**sections) -> dict:
    """A complete recipe dict around the exact GMM denoiser; keyword sections override."""
    recipe = {
        "data": {"name": "gmm", "modes": 8, "radius": 2.0, "std": 0.15},
        "chain": "vp",
        "schedule": "linear",
        "noise": "gaussian",
        "denoiser": "gmm-oracle",
        "parameterization": "eps",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 50},
    }
    recipe.update(sections)
    return recipe


def kit_pairs(component_cls, chain_cls, chain_capabilities) -> bool:
    """Whether fundiff.testing's checks of a component paired with a chain apply.

    ``chain_capabilities`` is what any registered chain provides (the kind of state: Gaussian
    marginals, categorical, manifold, ...). The chain must provide every one of them that the
    component requires; a component that requires none of them is written for Gaussian
    chains (as the kit's Gaussian checks assume) and is paired with chains that provide
    ``gaussian-marginals`` only."""
    from fundiff.components import GAUSSIAN_MARGINALS

    needed = component_cls.requires & chain_capabilities
    if needed:
        return needed <= chain_cls.provides
    return GAUSSIAN_MARGINALS in chain_cls.provides
