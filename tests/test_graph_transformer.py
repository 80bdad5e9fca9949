"""The community-graphs data set and the graph-transformer denoiser (survey sec. 4.1.2,
Dwivedi and Bresson 2021): the planted-partition model's edge frequencies, exact node-
permutation equivariance f(P X P^T) = P f(X) P^T, the symmetric readout, refusals, and an
end-to-end run whose sampled graphs have a data-like degree distribution."""

from __future__ import annotations

import math
import os

import pytest
import torch

import fundiff
from fundiff import BuildContext, DataSpec
from fundiff.errors import FundiffError, RecipeError
from fundiff.testing import check_component

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


def _network(registry, nodes: int = 7, dtype=torch.float64, **params):
    config = registry.build("denoiser", "graph-transformer", width=16, edge_width=8, depth=2, heads=2, **params)
    module = config.build(BuildContext(spec=DataSpec(shape=(1, nodes, nodes), modality="images"), components={}))
    torch.manual_seed(0)
    with torch.no_grad():  # move every parameter off its (partly zero) initialisation
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return module.to(dtype).eval()


def test_community_graphs_conform_and_are_symmetric_pm_one_with_zero_diagonal(registry):
    data = registry.build("data", "community-graphs", n=300, nodes=10)
    check_component("data", data)
    x = data.load().x[:, 0].double()
    assert torch.equal(x, x.transpose(1, 2))
    assert torch.equal(torch.diagonal(x, dim1=1, dim2=2), torch.zeros(300, 10, dtype=torch.float64))
    off = ~torch.eye(10, dtype=torch.bool)
    assert set(x[:, off].unique().tolist()) == {-1.0, 1.0}


def test_edge_frequencies_match_the_planted_partition(registry):
    """Stochastic block model: pairs inside a community are edges with probability p_in,
    across with p_out, independently. With m Bernoulli(p) trials the frequency has std
    sqrt(p (1 - p) / m); the bound is 5 std. The node order is random per graph: the first
    node is in community 0 with probability floor(N/2) / N (5-std bound on 2000 graphs)."""
    nodes, n, p_in, p_out = 10, 2000, 0.6, 0.15
    data = registry.build("data", "community-graphs", n=n, nodes=nodes, p_in=p_in, p_out=p_out, seed=4)
    adjacency, community = data.draw(n, 4)
    # the shown +-1 matrices are the drawn adjacency matrices
    assert torch.equal(data.load().x[:, 0].double(), torch.where(torch.eye(nodes, dtype=torch.bool), 0.0, 2 * adjacency - 1))
    i, j = torch.triu_indices(nodes, nodes, offset=1)
    edges = adjacency[:, i, j]
    same = community[:, i] == community[:, j]
    for mask, p in ((same, p_in), (~same, p_out)):
        trials = int(mask.sum())
        assert abs(edges[mask].mean().item() - p) < 5 * math.sqrt(p * (1 - p) / trials)
    assert (community.sum(1) == nodes - nodes // 2).all()
    first_in_zero = (community[:, 0] == 0).double().mean().item()
    q = (nodes // 2) / nodes
    assert abs(first_in_zero - q) < 5 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_denoiser_is_exactly_permutation_equivariant(registry, learned_variance):
    """f(P X P^T) = P f(X) P^T for random permutations P and non-symmetric noisy X. Only the
    order of summation changes, so float64 agrees to 1e-12 of the output scale (rounding
    is ~1e-16 per operation) and float32 to 1e-4."""
    nodes, batch = 7, 5
    generator = torch.Generator().manual_seed(1)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        module = _network(registry, nodes, dtype, learned_variance=learned_variance)
        x = torch.randn(batch, 1, nodes, nodes, generator=generator, dtype=torch.float64).to(dtype)
        logsnr = torch.linspace(-6, 6, batch, dtype=dtype)
        perm = torch.randperm(nodes, generator=generator)
        with torch.no_grad():
            out, var = module(x, logsnr, return_variance=True)
            out_p, var_p = module(x[:, :, perm][:, :, :, perm], logsnr, return_variance=True)
        scale = out.abs().max().item()
        assert scale > 1e-3  # not a trivially zero network
        assert torch.allclose(out_p, out[:, :, perm][:, :, :, perm], atol=tolerance * scale, rtol=0)
        if learned_variance:
            assert torch.allclose(var_p, var[:, :, perm][:, :, :, perm], atol=tolerance * var.abs().max().item(), rtol=0)
        else:
            assert var is None


def test_output_is_symmetric_and_noise_components_pass_through_with_one_gain(registry):
    """Symmetric input with a zero diagonal (the data's subspace) gives a symmetric output
    with a zero diagonal; for any input, out - out^T and diag(out) are g(lambda) times
    x - x^T and diag(x), one gain per sample (the pure-noise components' ideal prediction)."""
    nodes = 6
    module = _network(registry, nodes)
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(3, 1, nodes, nodes, generator=generator, dtype=torch.float64)
    logsnr = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    symmetric = (z + z.transpose(2, 3)) * (1 - torch.eye(nodes, dtype=torch.float64))
    with torch.no_grad():
        out = module(symmetric, logsnr)
        assert torch.allclose(out, out.transpose(2, 3), atol=1e-12 * out.abs().max().item(), rtol=0)
        assert torch.equal(torch.diagonal(out, dim1=2, dim2=3), torch.zeros(3, 1, nodes, dtype=torch.float64))
        general = module(z, logsnr)
    antisym_in, antisym_out = z - z.transpose(2, 3), general - general.transpose(2, 3)
    gain = (antisym_out * antisym_in).sum((1, 2, 3)) / antisym_in.square().sum((1, 2, 3))
    assert (gain > 0).all()
    assert torch.allclose(
        antisym_out, gain[:, None, None, None] * antisym_in, atol=1e-12 * antisym_out.abs().max().item(), rtol=0
    )
    diagonal_in, diagonal_out = torch.diagonal(z, dim1=2, dim2=3), torch.diagonal(general, dim1=2, dim2=3)
    assert torch.allclose(diagonal_out, gain[:, None, None] * diagonal_in, rtol=1e-12, atol=0)


def test_data_that_is_not_an_adjacency_matrix_is_refused(registry):
    config = registry.build("denoiser", "graph-transformer", width=8, heads=2)
    with pytest.raises(FundiffError, match=r"\(1, N, N\).*shape \(2,\)"):
        config.build(BuildContext(spec=DataSpec(shape=(2,)), components={}))
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "graphs.yaml"), registry).to_dict()
    recipe["data"] = {"name": "two-moons", "n": 64}
    with pytest.raises(RecipeError, match="graph-transformer"):
        fundiff.load_recipe(recipe, registry)
    with pytest.raises(FundiffError, match="must divide width"):
        registry.build("denoiser", "graph-transformer", width=10, heads=4)


def _degrees_and_triangles(adjacency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    degrees = adjacency.sum(2)
    triangles = torch.diagonal(adjacency @ adjacency @ adjacency, dim1=1, dim2=2).sum(1) / 6
    return degrees, triangles


def _wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two equal-size empirical distributions: the mean gap of sorted values."""
    return (torch.sort(a.flatten())[0] - torch.sort(b.flatten())[0]).abs().mean().item()


@pytest.mark.slow
def test_recipe_trains_and_samples_graphs_with_the_data_degree_distribution(tmp_path, registry):
    """recipes/graphs.yaml at test size (400 steps, about 8 s on 2 cores): samples thresholded
    at 0 and symmetrised. Their edge density is within 0.05 of the data's, and the W1
    distance of their degree distribution to the data's is under 0.75 times that of an
    Erdos-Renyi graph of the data's density (the planted partition makes degrees
    Bin(5, p_in) + Bin(6, p_out), variance 1.34 at 12 nodes, against ER's Bin(11, 0.34),
    variance 2.48). Measured: density 0.328 vs 0.344, degree W1 0.195 vs ER 0.380. The
    triangle-count distribution needs longer training (docs/denoisers.md): at this size its
    W1 is 4.90 against ER's 4.48, so it is not asserted here."""
    nodes, n = 12, 400
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "graphs.yaml"), registry).to_dict()
    recipe["data"]["n"] = 2000
    recipe["denoiser"].update(width=32, edge_width=16, depth=2, heads=2)
    recipe["train"].update(steps=400, batch_size=64, lr=3e-3, ema=0.99, warmup=20)
    recipe["sampler"]["steps"] = 20
    fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=n, seed=3)
    assert samples.shape == (n, 1, nodes, nodes) and torch.isfinite(samples).all()
    off_diagonal = 1 - torch.eye(nodes, dtype=torch.float64)
    drawn = (samples[:, 0].double() > 0).double()
    sampled = ((drawn + drawn.transpose(1, 2)) > 0).double() * off_diagonal
    data = (fundiff.Pipeline(fundiff.load_recipe(recipe, registry)).data.x[:n, 0].double() > 0).double()
    density = data.sum((1, 2)).mean().item() / (nodes * (nodes - 1))
    uniforms = torch.triu(torch.rand(n, nodes, nodes, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    erdos_renyi = ((uniforms > 0) & (uniforms < density)).double()
    erdos_renyi = erdos_renyi + erdos_renyi.transpose(1, 2)
    data_degrees, _ = _degrees_and_triangles(data)
    sample_degrees, _ = _degrees_and_triangles(sampled)
    baseline_degrees, _ = _degrees_and_triangles(erdos_renyi)
    sample_density = sampled.sum((1, 2)).mean().item() / (nodes * (nodes - 1))
    assert abs(sample_density - density) < 0.05, (sample_density, density)
    ours, baseline = _wasserstein_1d(sample_degrees, data_degrees), _wasserstein_1d(baseline_degrees, data_degrees)
    assert ours < 0.75 * baseline, (ours, baseline)
