"""``train.parallel: fsdp``: FSDP2 sharding under torchrun (two gloo processes on the CPU)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fundiff
from fundiff import FundiffError, RecipeError, distributed
from fundiff.checkpoint import load_checkpoint
from fundiff.cli import main
from fundiff.components import BuildContext
from fundiff.pipeline import check_memory
from fundiff.testing import check_fsdp
from helpers import RECIPES, ROOT


def tiny_recipe(**train) -> dict:
    """test_distributed.py's two-moons recipe: a one-block MLP, 16 steps of a global batch of 32."""
    recipe = yaml.safe_load(pathlib.Path(RECIPES, "two-moons.yaml").read_text())
    recipe["denoiser"].update(width=32, depth=1)
    recipe["sampler"]["steps"] = 6
    recipe["train"] = {
        "steps": 16,
        "batch_size": 32,
        "lr": 2e-3,
        "ema": 0.9,
        "checkpoint_every": 8,
        "log_every": 2,
        "seed": 3,
        **train,
    }
    return recipe


def write(tmp_path, recipe: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(*args: str, processes: int = 1) -> str:
    launcher = [sys.executable, "-m", "fundiff"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "fundiff",
        ]
    result = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in pathlib.Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape and value.dtype == b[key].dtype, key
        assert torch.allclose(value, b[key], rtol=0, atol=atol), (key, float((value - b[key]).abs().max()))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, registry):
    """The single-process reference, trained in this process: 16 steps, checkpoints at 8 and 16."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    fundiff.train(tiny_recipe(), run_dir, quiet=True, registry=registry)
    return run_dir


@pytest.mark.slow
def test_two_fsdp_processes_follow_the_single_process_trajectory(tmp_path, single_run):
    """Two gloo ranks each take half of the global batch (the examples, levels and noise a
    single process draws for those positions: per-position Philox streams); FSDP
    reduce-scatters the averaged gradients to slices and AdamW steps each slice. As with DDP
    (test_distributed.py), only the order of float32 sums differs from one process (half-batch
    means, the reduce-scatter, the clipping norm summed from slices in float64), about 1e-7
    relative per step, which AdamW's normalised updates keep at that scale over 16 steps:
    losses agree to 1e-5 relative, weights, EMA and AdamW moments to 1e-5 absolute (measured
    when written: 6e-8). The checkpoint is the unsharded format (same keys, shapes and
    dtypes) and a single process samples it."""
    recipe = write(tmp_path, tiny_recipe(parallel="fsdp"))
    run("train", recipe, "--run-dir", str(tmp_path / "fsdp"), "-q", processes=2)
    one, two = losses(single_run), losses(tmp_path / "fsdp")
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    reference, _ = load_checkpoint(str(single_run / "checkpoint.safetensors"))
    sharded, metadata = load_checkpoint(str(tmp_path / "fsdp" / "checkpoint.safetensors"))
    assert metadata["step"] == "16"
    assert_same_state(reference, sharded, atol=1e-5)
    assert main(["sample", str(tmp_path / "fsdp"), "-n", "16", "--no-plot", "-q", "--out", str(tmp_path / "samples")]) == 0
    drawn = load_file(str(tmp_path / "samples.safetensors"))["samples"]
    assert drawn.shape == (16, 2) and torch.isfinite(drawn).all()


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_sharded(tmp_path, single_run):
    """Written by one process under the default ddp, continued by two FSDP processes
    (``--set train.parallel=fsdp``: the option may change on resume): the full AdamW moments
    are sliced like their parameters on load, and the run ends where the single-process run
    ends (tolerance as above)."""
    recipe = write(tmp_path, tiny_recipe())
    assert main(["train", recipe, "--run-dir", str(tmp_path / "mixed"), "--steps", "8", "-q"]) == 0
    run("train", recipe, "--run-dir", str(tmp_path / "mixed"), "--resume", "--set", "train.parallel=fsdp", "-q", processes=2)
    reference, _ = load_checkpoint(str(single_run / "checkpoint.safetensors"))
    resumed, metadata = load_checkpoint(str(tmp_path / "mixed" / "checkpoint.safetensors"))
    assert metadata["step"] == "16"
    assert_same_state(reference, resumed, atol=1e-5)
    assert losses(tmp_path / "mixed") == pytest.approx(losses(single_run), rel=1e-5)


def test_one_process_fsdp_trains_unsharded_and_says_so(tmp_path, registry, capsys):
    """Outside torchrun there is nothing to shard across: the run is the ddp run, bit for bit."""
    fsdp = fundiff.train(tiny_recipe(steps=3, parallel="fsdp"), tmp_path / "fsdp", registry=registry)
    assert "train.parallel: fsdp shards across torchrun processes; one process trains unsharded" in capsys.readouterr().err
    ddp = fundiff.train(tiny_recipe(steps=3), tmp_path / "ddp", quiet=True, registry=registry)
    for (name, a), b in zip(fsdp.model.state_dict().items(), ddp.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_parallel_must_be_ddp_or_fsdp(registry):
    with pytest.raises(RecipeError) as info:
        fundiff.load_recipe(tiny_recipe(parallel="zero3"), registry)
    assert dict(info.value.problems)["train.parallel"].startswith("must be one of 'ddp', 'fsdp', got 'zero3'")


@pytest.mark.parametrize(
    "name, params",
    [
        ("mlp", {"width": 16, "depth": 2, "learned_variance": True}),
        (
            "unet",
            {
                "channels": 8,
                "channel_mult": (1, 2),
                "blocks": 1,
                "num_groups": 4,
                "attention_resolutions": (4,),
                "conditional": True,
            },
        ),
        (
            "unet",
            {
                "channels": 8,
                "channel_mult": (1, 2),
                "blocks": 1,
                "num_groups": 4,
                "conditioning": "cross-attention",
                "conditional": True,
            },
        ),
        ("dit", {"width": 16, "depth": 2, "heads": 2, "patch_size": 2, "conditional": True}),
        ("uvit", {"width": 16, "depth": 3, "heads": 2, "patch_size": 2, "conditional": True}),
    ],
    ids=["mlp", "unet", "unet-cross-attention", "dit", "uvit"],
)
def test_every_built_in_network_shards(registry, name, params):
    """Each built-in denoiser's blocks (the modules in its ModuleLists) are FSDP units whose
    parameters are used only inside their own forward: sharded output and gradients match the
    plain network, and unsharding restores it (fundiff.testing.check_fsdp)."""
    data = registry.build("data", "digits")
    network = registry.build("denoiser", name, **params).build(BuildContext(spec=data.spec(), components={"data": data}))
    assert distributed.shard_units(network), "no units: the whole network would be one all-gather"
    torch.manual_seed(0)
    check_fsdp(network, torch.randn(4, 1, 8, 8), torch.linspace(-5.0, 5.0, 4), torch.tensor([1, -1, 2, 3]))


def test_a_network_can_name_its_own_units():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)

        def fsdp_units(self):
            return [self.first]

        def forward(self, x, logsnr, cond=None):
            return self.second(torch.tanh(self.first(x)))

    net = Net()
    assert distributed.shard_units(net) == [net.first]
    check_fsdp(net, torch.randn(5, 3), torch.zeros(5))


def test_check_fsdp_catches_a_unit_used_outside_its_forward():
    """A ModuleList block whose weight the parent reads directly cannot be its own unit."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3)])

        def forward(self, x, logsnr, cond=None):
            return self.blocks[0](x) @ self.blocks[0].weight  # the weight outside the block's forward

    with pytest.raises(Exception):  # noqa: B017 - DTensor's mixed-tensor error, whatever its type
        check_fsdp(Tied(), torch.randn(2, 3), torch.zeros(2))


def test_memory_estimate_divides_the_sharded_copies(registry, monkeypatch):
    """check_memory: 5 float32 copies (weights, gradients, two AdamW moments, EMA) on one
    process; under fsdp with W processes max(1, 5 / W) copies, since each rank first builds the
    whole model. With room for three copies, ddp is refused (naming fsdp) and fsdp on 4 ranks
    fits."""
    recipe = fundiff.load_recipe(tiny_recipe(), registry)
    context = BuildContext(spec=recipe["data"].spec(), components=dict(recipe.components))
    params = sum(p.numel() for p in recipe["denoiser"].build(context).parameters())
    monkeypatch.setattr(fundiff.pipeline, "_available_memory", lambda device: params * 4 * 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(FundiffError, match="train.parallel: fsdp under torchrun"):
        check_memory(recipe["denoiser"], context, recipe, torch.device("cpu"))
    sharded = fundiff.load_recipe(tiny_recipe(parallel="fsdp"), registry)
    check_memory(sharded["denoiser"], context, sharded, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(FundiffError, match="make the denoiser smaller"):
        check_memory(sharded["denoiser"], context, sharded, torch.device("cpu"))
