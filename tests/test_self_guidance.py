"""Self-guidance (Epstein et al. 2023, eq. 3): feature matching on a named module of the
denoiser, delta x0 = -w sigma^2 / alpha grad_x E, E = 1/2 mean (h - h*)^2.

A tiny untrained mlp (width 16, float64) is enough: the guidance is a statement about the
network's own activations, whatever the network has learned."""

from __future__ import annotations

import fundiff
import pytest
import torch
from fundiff.pipeline import make_predict
from fundiff_plugins.guidances import self_guidance as sg
from helpers import oracle_recipe

MLP = {"name": "mlp", "width": 16, "depth": 2, "embed_dim": 8}
MODULE = "blocks.1.fc2"


def reference_file(tmp_path, p) -> str:
    """Reference examples: the data's points of class 0 (one mode of the ring)."""
    data = p.data
    return sg.write_tensor_file(str(tmp_path / "ref.safetensors"), "x", data.x[data.labels == 0][:32].double())


def make(registry, tmp_path, **guidance) -> fundiff.Pipeline:
    torch.manual_seed(0)
    base = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(denoiser=MLP, data={"name": "gmm", "modes": 8, "n": 256}), registry))
    options = {"name": "self-guidance", "module": MODULE, "reference": reference_file(tmp_path, base), **guidance}
    torch.manual_seed(0)
    p = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(denoiser=MLP, data={"name": "gmm", "modes": 8, "n": 256}, guidance=options), registry))
    p.model.double()
    return p


def points(n: int, level) -> torch.Tensor:
    z = fundiff.rng.normal(7, 1000, 0, torch.arange(n), (2,))
    return level.alpha * 2.0 * z + level.sigma * z.flip(1)


def test_scale_zero_is_the_unguided_prediction(registry, tmp_path):
    """w = 0: the guided estimate is the network's prediction, bit for bit."""
    p = make(registry, tmp_path, scale=0.0)
    predict = make_predict(p.model, p.parameterization)
    for level in p.levels(6)[:-1]:
        x = points(8, level)
        assert torch.equal(p.guidance.start(None).denoise(predict, x, level, None), predict(x, level, None))


def test_gradient_term_matches_finite_differences(registry, tmp_path):
    """guided - unguided = -w sigma^2 / alpha grad_x E (eq. 3 in x0 form); grad_x E compared
    with central differences of E in float64 (step 1e-6: truncation error ~1e-12 x third
    derivative, rounding ~1e-16 / 1e-6 = 1e-10 relative; bound 1e-7 relative)."""
    p = make(registry, tmp_path, scale=0.7)
    predict = make_predict(p.model, p.parameterization)
    level = p.levels(10)[4]
    x = points(4, level)
    run = p.guidance.start(None)
    guided = run.denoise(predict, x, level, None)
    with torch.no_grad():
        plain = predict(x, level, None)
    target = run.target(predict, p.model, level, x)

    def energy(z):
        with torch.no_grad():
            _, h = sg.capture(p.model, MODULE, lambda: predict(z, level, None))
        return sg.feature_energy(h, target)

    step = 1e-6
    fd = torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = step
        fd[:, j] = (energy(x + e) - energy(x - e)) / (2 * step)
    expected = -0.7 * level.sigma**2 / level.alpha * fd
    assert fd.abs().max() > 1e-6  # a nonzero gradient: the check is not vacuous
    assert (guided - plain - expected).abs().max() <= 1e-7 * expected.abs().max()


@pytest.mark.slow
def test_guidance_lowers_the_feature_energy_of_samples(registry, tmp_path):
    """A small mlp (width 32, 200 steps) on the 8-mode ring, guided to match the features of
    ``blocks.0.fc2`` on class-0 reference points: the samples' feature energy, averaged over
    8 levels of the grid (measured on the noise-free points alpha x, the way the target is
    defined), falls and the samples move to the reference's mode. Measured (n = 500):
    energy 0.096 unguided, 0.038 at w = 3, 0.0038 at w = 10; fraction nearest mode 0: 0.10,
    0.58, 1.00. Stated bounds at w = 10: energy below 0.2 x unguided, fraction above 0.8
    (unguided below 0.25, i.e. about 1/8)."""
    recipe = oracle_recipe(
        denoiser={"name": "mlp", "width": 32, "depth": 2, "embed_dim": 16},
        sampler={"name": "ddim", "steps": 20},
        train={"steps": 200, "batch_size": 128, "lr": 3e-3, "ema": 0.98, "seed": 0},
    )
    fundiff.train(fundiff.load_recipe(recipe, registry), tmp_path / "run", quiet=True)
    base = fundiff.load_run(tmp_path / "run", registry=registry)
    ref = sg.write_tensor_file(str(tmp_path / "ref.safetensors"), "x", base.data.x[base.data.labels == 0][:64])
    means = base.data_set.mixture()[1]
    energy, fraction = {}, {}
    for w in (0.0, 10.0):
        overrides = {"guidance.name": "self-guidance", "guidance.module": "blocks.0.fc2", "guidance.reference": ref, "guidance.scale": w}
        p = fundiff.load_run(tmp_path / "run", registry=registry, overrides=overrides)
        x, _ = p.sample(500, seed=1)
        model = p.sampling_model(True)
        predict = make_predict(model, p.parameterization)
        run = p.guidance.start(None)
        values = []
        for level in p.levels(10)[1:-1]:
            target = run.target(predict, model, level, x)
            with torch.no_grad():
                _, h = sg.capture(model, "blocks.0.fc2", lambda predict=predict, level=level, x=x: predict(level.alpha * x, level, None))
            values.append(float(sg.feature_energy(h, target).mean()))
        energy[w] = sum(values) / len(values)
        fraction[w] = float((torch.cdist(x.double(), means.double()).argmin(1) == 0).double().mean())
    assert energy[10.0] < 0.2 * energy[0.0], (energy, fraction)
    assert fraction[0.0] < 0.25 and fraction[10.0] > 0.8, (energy, fraction)


def test_refuses_an_unknown_module_and_missing_options(registry, tmp_path):
    """A module name the built network lacks, or a missing target, is a RecipeError at load."""
    with pytest.raises(fundiff.RecipeError, match="no module 'nope'"):
        make(registry, tmp_path, module="nope")
    with pytest.raises(fundiff.RecipeError, match="exactly one of reference"):
        fundiff.load_recipe(oracle_recipe(denoiser=MLP, guidance={"name": "self-guidance", "module": MODULE}), registry)


def test_target_file_is_used_at_every_level(registry, tmp_path):
    """With a target activation file, E is measured against that tensor; a target equal to
    the current activation gives zero gradient: the estimate is unguided."""
    p0 = make(registry, tmp_path, scale=0.0)
    predict = make_predict(p0.model, p0.parameterization)
    level = p0.levels(10)[3]
    x = points(1, level)
    with torch.no_grad():
        _, h = sg.capture(p0.model, MODULE, lambda: predict(x, level, None))
    path = sg.write_tensor_file(str(tmp_path / "h.safetensors"), "h", h[0])
    p = make(registry, tmp_path, scale=2.0, reference="", target=path)
    predict = make_predict(p.model, p.parameterization)
    out = p.guidance.start(None).denoise(predict, x, level, None)
    with torch.no_grad():
        assert torch.allclose(out, predict(x, level, None), rtol=0, atol=1e-12)
