"""Reliability: numerical faults are named, crashes lose nothing, runs resume exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import attrs
import pytest
import torch
import yaml

import fundiff
from fundiff.checkpoint import load_checkpoint
from helpers import RECIPES, ROOT, oracle_recipe


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, body in hooks.items():
        setattr(module, hook, fundiff.hookimpl(body))
    return module


@attrs.frozen(kw_only=True)
class NaNAtHighSNR(fundiff.Weighting):
    """eps-MSE that turns NaN for logSNR above 6: a fault that strikes some batches only."""

    def sample_logsnr(self, u, schedule):
        return schedule.logsnr(schedule.t_min + (1 - schedule.t_min) * u)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return torch.where(logsnr > 6, torch.full_like(logsnr, float("nan")), logsnr)


@attrs.frozen(kw_only=True)
class NaNBelowNoise(fundiff.Guidance):
    """Returns NaN once the noise level falls under sigma = 0.5."""

    def denoise(self, predict, x, level, cond):
        x0 = predict(x, level, cond)
        return x0 * float("nan") if level.sigma < 0.5 else x0


@pytest.fixture(scope="module")
def faulty_registry():
    module = plugin_module(
        "faulty",
        fundiff_register_weightings=lambda register: register("nan-at-high-snr", NaNAtHighSNR),
        fundiff_register_guidances=lambda register: register("nan-below-noise", NaNBelowNoise),
    )
    return fundiff.Registry.discover(plugins=[("faulty", module)])


def tiny_recipe(**train) -> dict:
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml")).to_dict()
    recipe["denoiser"].update(width=16, depth=1)
    recipe["sampler"]["steps"] = 5
    recipe["train"].update({"steps": 40, "batch_size": 16, "checkpoint_every": 1, "log_every": 5, **train})
    return recipe


def test_nonfinite_loss_stops_naming_step_component_and_level(tmp_path, faulty_registry):
    recipe = tiny_recipe()
    recipe["weighting"] = {"name": "nan-at-high-snr"}
    run = tmp_path / "run"
    with pytest.raises(fundiff.FundiffError) as info:
        fundiff.train(recipe, run, quiet=True, registry=faulty_registry)
    message = str(info.value)
    step = int(message.split("at step ")[1].split(" ")[0])
    assert "weighting 'nan-at-high-snr'" in message and "logSNR [" in message
    assert f"the last checkpoint (step {step}) is kept" in message
    # the failing batch really has a logSNR above 6, and the earlier ones did not
    pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe, faulty_registry))
    assert (pipeline.training_logsnr(step, 16) > 6).any()
    assert all(not (pipeline.training_logsnr(k, 16) > 6).any() for k in range(step))
    _, meta = load_checkpoint(str(run / "checkpoint.safetensors"))
    assert int(meta["step"]) == step


def test_nonfinite_batches_can_be_skipped_and_are_counted(tmp_path, faulty_registry):
    recipe = tiny_recipe(on_nonfinite="skip")
    recipe["weighting"] = {"name": "nan-at-high-snr"}
    run = tmp_path / "run"
    pipeline = fundiff.train(recipe, run, quiet=True, registry=faulty_registry)
    expected = sum(bool((pipeline.training_logsnr(k, 16) > 6).any()) for k in range(40))
    assert expected > 0
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert lines[-1]["step"] == 40 and lines[-1]["skipped"] == expected
    assert all(torch.isfinite(p).all() for p in pipeline.model.parameters())


def test_sampler_fault_names_sampler_step_and_level(faulty_registry):
    pipeline = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(guidance="nan-below-noise", sampler={"name": "ddim", "steps": 10}), faulty_registry))
    levels = pipeline.levels()
    first = next(i for i, level in enumerate(levels) if level.sigma < 0.5)
    with pytest.raises(fundiff.FundiffError, match=f"sampler 'ddim' produced NaN or Inf at step {first} "):
        pipeline.sample(8)


def _run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fundiff", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_the_exact_trajectory(tmp_path):
    """SIGKILL a real training process several times; each restart with --resume continues
    from the last complete checkpoint, and the final weights, EMA and optimizer state equal an
    uninterrupted run's bit for bit (CPU)."""
    recipe = tiny_recipe(steps=400, checkpoint_every=9, log_every=10)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    straight = tmp_path / "straight"
    assert _run_cli("train", str(path), "--run-dir", str(straight), "-q").wait(timeout=300) == 0
    killed = tmp_path / "killed"
    delays = random.Random(7)
    kills = 0
    for _ in range(3):
        process = _run_cli("train", str(path), "--run-dir", str(killed), "--resume", "-q")
        # wait until this process has made progress past its start, then kill it at a random moment
        start_step = _step(killed)
        deadline = time.monotonic() + 120
        while process.poll() is None and _step(killed) <= start_step and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delays.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    assert kills >= 1, "the run finished before any kill: make it longer"
    finish = _run_cli("train", str(path), "--run-dir", str(killed), "--resume", "-q")
    assert finish.wait(timeout=300) == 0, finish.stderr.read()
    a, meta_a = load_checkpoint(str(straight / "checkpoint.safetensors"))
    b, meta_b = load_checkpoint(str(killed / "checkpoint.safetensors"))
    assert meta_a["step"] == meta_b["step"] == "400"
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert logged == sorted(set(logged)), "a metric line was repeated after a resume"


def _step(run) -> int:
    try:
        return int(load_checkpoint(os.path.join(run, "checkpoint.safetensors"))[1]["step"])
    except fundiff.FundiffError:
        return -1


@pytest.mark.slow
def test_killed_sampling_resumes_without_duplicates_or_gaps(tmp_path):
    """`fundiff sample` writes each batch as it completes; a run killed part-way and started
    again reads the finished parts back and draws only the rest, giving exactly the samples
    of an uninterrupted run."""
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(oracle_recipe(sampler={"name": "ddpm", "steps": 400})))
    assert _run_cli("train", str(recipe), "--run-dir", str(run), "-q").wait(timeout=120) == 0
    args = ["sample", str(run), "-n", "600", "--batch-size", "50", "--no-plot", "-q"]
    whole = tmp_path / "whole"
    assert _run_cli(*args, "--out", str(whole)).wait(timeout=300) == 0
    part = tmp_path / "part"
    process = _run_cli(*args, "--out", str(part))
    deadline = time.monotonic() + 120
    while process.poll() is None and len(list((tmp_path / "part.parts").glob("*.safetensors"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done_before = len(list((tmp_path / "part.parts").glob("*.safetensors")))
    assert 0 < done_before < 12
    assert _run_cli(*args, "--out", str(part)).wait(timeout=300) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(whole) + ".safetensors")["samples"], load_file(str(part) + ".safetensors")["samples"])
    assert not (tmp_path / "part.parts").exists()


@pytest.mark.parametrize("schedule", sorted(set(fundiff.Registry.discover().names("schedule")) - {"learned"}))
def test_mixed_precision_stays_finite_at_the_schedule_extremes(schedule, registry):
    """bf16 autocast training and fp16 autocast sampling stay finite for every schedule,
    including its endpoints (t = t_min and t = 1; zero terminal SNR with v-prediction)."""
    recipe = tiny_recipe(steps=2, precision="bf16")
    recipe["schedule"] = {"name": schedule}
    recipe["parameterization"] = {"name": "v"}
    recipe["sample"] = {"precision": "fp16", "num_samples": 8}
    pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe, registry))
    for step in range(2):
        loss = pipeline.loss(step, 16)
        assert torch.isfinite(loss)
        loss.backward()
    grads = [p.grad for p in pipeline.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    samples, _ = pipeline.sample(8, steps=4)
    assert torch.isfinite(samples).all()
    # the extremes themselves: the network evaluated at the first and last sampling levels
    levels = pipeline.levels(4)
    model = pipeline.sampling_model()
    for level in (levels[0], levels[-2]):
        x = torch.randn(4, 2)
        with fundiff.pipeline.autocast(pipeline.device, "fp16"):
            out = fundiff.make_denoise(model, pipeline.parameterization, pipeline.guidance)(x, level)
        assert torch.isfinite(out).all(), level


def test_recipe_too_large_for_memory_is_refused_before_allocation(registry):
    """A denoiser of ~10^12 parameters is refused from a meta-device estimate, instantly."""
    recipe = tiny_recipe()
    recipe["denoiser"].update(width=400_000, depth=4)
    started = time.monotonic()
    with pytest.raises(fundiff.FundiffError, match=r"parameters: training needs about [\d.]+ GiB .* make the denoiser smaller"):
        fundiff.Pipeline(fundiff.load_recipe(recipe, registry))
    assert time.monotonic() - started < 30


def test_sampler_inputs_are_checked_before_the_loop(registry):
    """Wrong inputs to any sampler (built-in or third-party: the check wraps every subclass)
    are refused with the sampler's name and what it expected."""
    chain, schedule = registry.build("chain", "vp"), registry.build("schedule", "cosine")
    levels = fundiff.noise_levels(schedule, chain, 4)
    calls = []

    def denoise(x, level):
        calls.append(level)
        return x

    for name in registry.names("sampler"):
        sampler = registry.build("sampler", name, steps=4)
        label = type(sampler).__name__
        with pytest.raises(ValueError, match=f"{label}.sample: x must be a floating-point tensor"):
            sampler.sample(denoise, torch.zeros(4, dtype=torch.long).reshape(2, 2), levels)
        with pytest.raises(ValueError, match=f"{label}.sample: levels must go from noisy to clean"):
            sampler.sample(denoise, torch.zeros(2, 2), levels[::-1])
    assert calls == []


def test_missing_or_broken_data_files_are_named(tmp_path):
    """A recipe's data file that is missing, unreadable, or lacks the array is refused with
    the path, through the CLI with exit status 2 and no traceback."""
    from test_cli import fundiff as run_cli
    from test_cli import user_error, write_recipe

    recipe = oracle_recipe(data={"name": "tensor-file", "path": str(tmp_path / "nope.npz")}, denoiser="mlp")
    user_error(run_cli("check", write_recipe(tmp_path, recipe)), f"data: data file not found: {tmp_path / 'nope.npz'}")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    recipe["data"]["path"] = str(tmp_path / "bad.npz")
    user_error(run_cli("train", write_recipe(tmp_path, recipe), "--run-dir", str(tmp_path / "r")), "cannot read")
    import numpy as np

    np.savez(tmp_path / "ok.npz", points=np.zeros((10, 2)))
    recipe["data"]["path"] = str(tmp_path / "ok.npz")
    user_error(run_cli("train", write_recipe(tmp_path, recipe), "--run-dir", str(tmp_path / "r")), "has no array 'x'; it has: points")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_user_data_from_a_file_trains_and_samples(tmp_path, registry):
    import numpy as np

    points = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=points, labels=np.arange(300) % 3)
    recipe = tiny_recipe(steps=3)
    recipe["data"] = {"name": "tensor-file", "path": str(tmp_path / "mine.npz")}
    pipeline = fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    assert pipeline.spec.shape == (3,) and pipeline.spec.num_classes == 3
    samples, _ = pipeline.sample(5)
    assert samples.shape == (5, 3) and torch.isfinite(samples).all()
