"""The generic training loop: learning two-moons, exact resumption, run directories."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fundiff
from fundiff.checkpoint import load_checkpoint
from helpers import RECIPES, sliced_wasserstein


def tiny(**train) -> dict:
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml")).to_dict()
    recipe["denoiser"].update(width=32, depth=1)
    recipe["train"].update({"steps": 12, "batch_size": 16, "checkpoint_every": 5, "log_every": 4, **train})
    return recipe


@pytest.mark.slow
def test_short_two_moons_run_samples_close_to_the_data(tmp_path, registry):
    """A 1500-step run (about 15 s on 2 cores) must learn the two moons.

    Statistics against N held-out data points: the sliced Wasserstein-2 distance, bounded by
    3 times the floor between two data draws and required to beat a moment-matched Gaussian
    by a factor of 2; and the mean distance from a sample to its nearest data point, which
    for the two moons' thin arcs must be under half the Gaussian's."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml"), registry).to_dict()
    recipe["denoiser"].update(width=96, depth=2)
    recipe["train"].update(steps=1500, batch_size=256, lr=3e-3, ema=0.99)
    recipe["sampler"]["steps"] = 30
    n = 2000
    fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=n, seed=3)
    data = fundiff.Pipeline(fundiff.load_recipe(recipe, registry)).data.x.double()
    held_a, held_b = data[:n], data[n : 2 * n]
    floor = sliced_wasserstein(held_a, held_b)
    gaussian = held_b.mean(0) + held_b.std(0) * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sw_samples = sliced_wasserstein(samples.double(), held_a)
    sw_gaussian = sliced_wasserstein(gaussian, held_a)
    assert sw_samples < 3 * floor, (sw_samples, floor)
    assert sw_samples < 0.5 * sw_gaussian, (sw_samples, sw_gaussian)
    nn_samples = torch.cdist(samples.double(), data[:8000]).min(1).values.mean()
    nn_gaussian = torch.cdist(gaussian, data[:8000]).min(1).values.mean()
    assert nn_samples < 0.5 * nn_gaussian, (nn_samples, nn_gaussian)


def test_resumed_run_continues_the_exact_trajectory(tmp_path, registry):
    """Training 12 steps straight equals 5 steps, a stop, and a resume to 12, bit for bit:
    batches, noise levels and noise are functions of (seed, step), and the checkpoint holds
    the model, EMA and AdamW state."""
    straight = fundiff.train(tiny(), tmp_path / "straight", quiet=True, registry=registry)
    fundiff.train(tiny(steps=5), tmp_path / "resumed", quiet=True, registry=registry)
    resumed = fundiff.train(tiny(), tmp_path / "resumed", resume=True, quiet=True, registry=registry)
    a, _ = load_checkpoint(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b, _ = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.step == resumed.step == 12
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [4, 5, 8, 12]  # the first run logged its last step 5; no step is logged twice


def test_run_directory_is_never_overwritten_without_resume(tmp_path, registry):
    run = tmp_path / "run"
    fundiff.train(tiny(steps=3), run, quiet=True, registry=registry)
    before = (run / "checkpoint.safetensors").read_bytes()
    with pytest.raises(fundiff.FundiffError, match="--resume"):
        fundiff.train(tiny(steps=3), run, quiet=True, registry=registry)
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_resume_with_a_different_recipe_is_refused(tmp_path, registry):
    run = tmp_path / "run"
    fundiff.train(tiny(steps=3), run, quiet=True, registry=registry)
    changed = tiny(steps=6)
    changed["train"]["lr"] = 1e-4
    with pytest.raises(fundiff.FundiffError, match="train.lr"):
        fundiff.train(changed, run, resume=True, quiet=True, registry=registry)


def test_run_directory_records_the_resolved_recipe_and_plugin_versions(tmp_path, registry):
    run = tmp_path / "run"
    fundiff.train(tiny(steps=2), run, quiet=True, registry=registry)
    stored = fundiff.load_recipe(str(run / "recipe.yaml"), registry)
    assert stored.to_dict() == fundiff.load_recipe(tiny(steps=2), registry).to_dict()
    plugins = json.loads((run / "plugins.json").read_text())
    assert plugins["components"]["sampler"] == {"name": "ddim", "plugin": "ddim", "distribution": "fundiff", "version": fundiff.__version__}


def test_sampling_a_run_with_another_sampler(tmp_path, registry):
    run = tmp_path / "run"
    fundiff.train(tiny(steps=2), run, quiet=True, registry=registry)
    samples, labels = fundiff.sample(run, registry=registry, overrides={"sampler.name": "ddpm", "sampler.steps": 7}, num_samples=9, batch_size=4)
    assert samples.shape == (9, 2) and torch.isfinite(samples).all() and labels is None
    with pytest.raises(fundiff.FundiffError, match="cannot override denoiser.width"):
        fundiff.load_run(run, registry=registry, overrides={"denoiser.width": 8})


def test_oracle_run_needs_no_training(tmp_path, registry):
    from helpers import oracle_recipe

    run = tmp_path / "oracle"
    pipeline = fundiff.train(oracle_recipe(), run, quiet=True, registry=registry)
    assert not pipeline.trainable
    samples, _ = fundiff.sample(run, registry=registry, num_samples=64)
    assert samples.shape == (64, 2)
    assert abs(float(samples.norm(dim=1).mean()) - 2.0) < 0.2  # the ring has radius 2
