"""Multi-process training and sampling with torchrun on the gloo backend (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fundiff.checkpoint import load_checkpoint
from helpers import RECIPES, ROOT

pytestmark = pytest.mark.slow


def tiny_recipe(tmp_path, **train) -> str:
    recipe = yaml.safe_load(open(os.path.join(RECIPES, "two-moons.yaml")))
    recipe["denoiser"].update(width=32, depth=1)
    recipe["sampler"]["steps"] = 6
    recipe["train"] = {"steps": 16, "batch_size": 32, "lr": 2e-3, "ema": 0.9, "checkpoint_every": 8, "log_every": 2, "seed": 3, **train}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(*args: str, processes: int = 1) -> None:
    launcher = [sys.executable, "-m", "fundiff"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "fundiff"]
    result = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_processes_follow_the_single_process_trajectory(tmp_path):
    """Two gloo ranks each take half of the global batch (the same examples, levels and noise
    a single process draws: per-position Philox streams), and DDP averages the gradients.
    The only difference is the order of float32 sums (a half-batch mean per rank, then the
    all-reduce), about 1e-7 relative per step; AdamW's normalised updates keep it at that
    scale over 16 steps, so losses agree to 1e-5 relative and weights to 1e-5 absolute."""
    recipe = tiny_recipe(tmp_path)
    run("train", recipe, "--run-dir", str(tmp_path / "one"), "-q")
    run("train", recipe, "--run-dir", str(tmp_path / "two"), "-q", processes=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    a, _ = load_checkpoint(str(tmp_path / "one" / "checkpoint.safetensors"))
    b, _ = load_checkpoint(str(tmp_path / "two" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("model.", "ema.")):
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key


def test_resume_with_another_number_of_processes(tmp_path):
    """A run checkpointed by two ranks continues on one process (the checkpoint holds the
    whole state; the batch split is recomputed), ending where a single-process run ends."""
    recipe = tiny_recipe(tmp_path)
    run("train", recipe, "--run-dir", str(tmp_path / "one"), "-q")
    run("train", recipe, "--run-dir", str(tmp_path / "mixed"), "--steps", "8", "-q", processes=2)
    run("train", recipe, "--run-dir", str(tmp_path / "mixed"), "--resume", "-q")
    a, meta_a = load_checkpoint(str(tmp_path / "one" / "checkpoint.safetensors"))
    b, meta_b = load_checkpoint(str(tmp_path / "mixed" / "checkpoint.safetensors"))
    assert meta_a["step"] == meta_b["step"] == "16"
    for key in a:
        if key.startswith("model."):
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key


def test_distributed_sampling_equals_single_process_bit_for_bit(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=4)
    run("train", recipe, "--run-dir", str(tmp_path / "run"), "-q")
    args = ["sample", str(tmp_path / "run"), "-n", "50", "--batch-size", "8", "--sampler", "ddpm", "--no-plot", "-q"]
    run(*args, "--out", str(tmp_path / "single"))
    run(*args, "--out", str(tmp_path / "multi"), processes=2)
    single = load_file(str(tmp_path / "single.safetensors"))["samples"]
    multi = load_file(str(tmp_path / "multi.safetensors"))["samples"]
    assert single.shape == (50, 2) and torch.equal(single, multi)
    assert not os.path.exists(tmp_path / "multi.parts")
