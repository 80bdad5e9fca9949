"""The ``diffusers-unet`` denoiser: diffusers' UNet2DModel behind fundiff's denoiser contract."""

from __future__ import annotations

import copy
import os
import pathlib
import sys

import pytest
import torch
import yaml

import fundiff
from fundiff import FundiffError, RecipeError
from fundiff.cli import main
from helpers import RECIPES

diffusers = pytest.importorskip("diffusers")

#: one 8x8 level with 8 channels, a 4x4 level with 16 and attention; 10 digits + the null label
TINY = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "num_class_embeds": 11,
}


def recipe(denoiser: dict | None = None, **sections) -> dict:
    data = yaml.safe_load(pathlib.Path(RECIPES, "diffusers-unet.yaml").read_text())
    data["denoiser"] = {"name": "diffusers-unet", "config": copy.deepcopy(TINY)} if denoiser is None else denoiser
    data["train"] = {"steps": 3, "batch_size": 8, "ema": 0.9, "log_every": 1, "seed": 1}
    data["sampler"] = {"name": "ddim", "steps": 3}
    data.update(sections)
    return data


def reference_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**TINY).eval()


def ddpm_logsnr(timesteps: torch.Tensor) -> torch.Tensor:
    """lambda at diffusers' 0-indexed timesteps, from its own DDPMScheduler (the linear betas
    of DDPM, T = 1000: the recipe's ``linear`` schedule)."""
    alphas_cumprod = diffusers.DDPMScheduler().alphas_cumprod.to(torch.float64)[timesteps]
    return torch.log(alphas_cumprod / (1 - alphas_cumprod))


def test_builds_a_unet2dmodel_from_an_inline_config(registry):
    pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry))
    network = pipeline.model
    assert isinstance(network.unet, diffusers.UNet2DModel)
    assert list(network.unet.config.block_out_channels) == [8, 16] and network.num_train_timesteps == 1000
    assert pipeline.uses_labels  # num_class_embeds with labelled data
    x = torch.randn(5, 1, 8, 8)
    out = network(x, torch.linspace(-6.0, 6.0, 5), torch.tensor([0, 9, -1, 3, 4]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_timestep_is_diffusers_index_of_the_same_noise_level(registry):
    """tau = T t(lambda) - 1 (module docs): fed the logSNR of diffusers' alphas_cumprod[tau],
    the wrapper gives back tau. diffusers computes its betas and their cumulative product
    in float32 (relative error <= ~1e-6 in alpha_bar); near tau = 0 the slope
    d log alpha_bar / d tau = -beta = -1e-4 turns that into <= 1e-2 in tau, far below the
    off-by-one the -1 exists to remove."""
    network = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry)).model
    taus = torch.tensor([0, 1, 17, 250, 500, 998, 999])
    mapped = network.timesteps(ddpm_logsnr(taus))
    assert mapped.dtype == torch.float32
    assert torch.allclose(mapped.double(), taus.double(), rtol=0, atol=1e-2), mapped


def test_output_equals_the_unet_called_with_the_mapped_timestep_and_labels(registry):
    pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry))
    network = pipeline.model.eval()
    torch.manual_seed(3)
    x = torch.randn(4, 1, 8, 8)
    logsnr = ddpm_logsnr(torch.tensor([3, 100, 640, 990])).float()
    labels = torch.tensor([7, -1, 0, 9])
    with torch.no_grad():
        out = network(x, logsnr, labels)
        # the null label -1 is the class embedding's last row (num_classes = 10)
        direct = network.unet(x, network.timesteps(logsnr), class_labels=torch.tensor([7, 10, 0, 9])).sample
        unconditional = network(x, logsnr, None)
        null_rows = network.unet(x, network.timesteps(logsnr), class_labels=torch.full((4,), 10)).sample
    assert torch.equal(out, direct)
    assert torch.equal(unconditional, null_rows)


def test_save_pretrained_weights_load_back_exactly(tmp_path, registry):
    """A save_pretrained directory (its config.json and safetensors weights) and the bare
    .safetensors file with the inline config both rebuild the saved network bit for bit."""
    unet = reference_unet(seed=5)
    unet.save_pretrained(tmp_path / "model", safe_serialization=True)
    torch.manual_seed(0)
    x, logsnr, labels = torch.randn(3, 1, 8, 8), torch.tensor([-4.0, 0.5, 6.0]), torch.tensor([1, 2, -1])
    outputs = []
    for denoiser in (
        {"name": "diffusers-unet", "weights": str(tmp_path / "model")},
        {"name": "diffusers-unet", "config": TINY, "weights": str(tmp_path / "model" / "diffusion_pytorch_model.safetensors")},
        {
            "name": "diffusers-unet",
            "config": str(tmp_path / "model"),
            "weights": str(tmp_path / "model" / "diffusion_pytorch_model.safetensors"),
        },
    ):
        network = fundiff.Pipeline(fundiff.load_recipe(recipe(denoiser), registry)).model.eval()
        for name, tensor in unet.state_dict().items():
            assert torch.equal(network.unet.state_dict()[name], tensor), name
        with torch.no_grad():
            outputs.append(network(x, logsnr, labels))
    with torch.no_grad():
        expected = unet(x, network.timesteps(logsnr), class_labels=torch.tensor([1, 2, 10])).sample
    for out in outputs:
        assert torch.equal(out, expected)


def test_pickled_weights_are_never_read(tmp_path, registry):
    reference_unet().save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not os.path.exists(tmp_path / "bin" / "diffusion_pytorch_model.safetensors")
    loaded = fundiff.load_recipe(recipe({"name": "diffusers-unet", "weights": str(tmp_path / "bin")}), registry)
    with pytest.raises(FundiffError, match=r"only safetensors weights are read \(no pickle\)"):
        fundiff.Pipeline(loaded)
    problems = _problems(
        {"name": "diffusers-unet", "config": TINY, "weights": str(tmp_path / "bin" / "diffusion_pytorch_model.bin")}, registry
    )
    assert problems == []  # the path exists; building refuses it:
    with pytest.raises(FundiffError, match="pickled .bin"):
        fundiff.Pipeline(
            fundiff.load_recipe(
                recipe(
                    {"name": "diffusers-unet", "config": TINY, "weights": str(tmp_path / "bin" / "diffusion_pytorch_model.bin")}
                ),
                registry,
            )
        )


def test_train_and_sample_through_the_python_api(tmp_path, registry):
    """Three optimizer steps, a checkpoint, and sampling the run from its directory (the
    EMA weights, classifier-free guidance with the null-label row)."""
    trained = fundiff.train(recipe(), tmp_path / "run", quiet=True, registry=registry)
    assert trained.step == 3
    before = reference_unet().state_dict()  # a fresh init differs from the trained weights
    assert any(not torch.equal(before[k], v) for k, v in trained.model.unet.state_dict().items() if k in before)
    samples, labels = fundiff.sample(tmp_path / "run", registry=registry, num_samples=6, batch_size=6)
    assert samples.shape == (6, 1, 8, 8) and torch.isfinite(samples).all()
    assert labels is not None and labels.shape == (6,)


def test_recipe_round_trips_with_the_inline_config(registry):
    loaded = fundiff.load_recipe(recipe(), registry)
    again = fundiff.load_recipe(yaml.safe_load(loaded.to_yaml()), registry)
    assert again.to_dict() == loaded.to_dict() and again["denoiser"] == loaded["denoiser"]


def _problems(denoiser: dict, registry, **sections) -> list[str]:
    try:
        fundiff.load_recipe(recipe(denoiser, **sections), registry)
    except RecipeError as exc:
        return [message for _, message in exc.problems]
    return []


@pytest.mark.parametrize(
    "change, sections, expected",
    [
        ({"in_channels": 3}, {}, "the config's in_channels is 3, but the data has 1 channels"),
        ({"out_channels": 2}, {}, "out_channels is 2, but the data has 1 channels (shape (1, 8, 8)) (a learned variance head"),
        ({"sample_size": 32}, {}, "the config's sample_size is 32, but the data is 8x8; use a config with sample_size: 8"),
        ({"num_class_embeds": 10}, {}, "drops labels (drop_prob > 0) to the null label"),
        ({"num_class_embeds": 4}, {}, "num_class_embeds is 4, fewer than the data's 10 classes"),
        ({"time_embedding_type": "fourier"}, {}, "time_embedding_type 'fourier' takes sigma"),
        (
            {"block_out_chanels": [8, 16]},
            {},
            "'block_out_chanels' is not an argument of UNet2DModel; did you mean 'block_out_channels'",
        ),
        ({"up_block_types": ["UpBlock2D"]}, {}, "UNet2DModel refuses the config: Must provide the same number"),
        ({}, {"variance": {"name": "learned-range"}}, "has no learned-variance output"),
    ],
)
def test_configs_that_do_not_fit_the_recipe_are_refused_at_load(registry, change, sections, expected):
    problems = _problems({"name": "diffusers-unet", "config": {**TINY, **change}}, registry, **sections)
    assert any(expected in problem for problem in problems), problems
    # one message, except that the learned-range variance also reports its own missing input
    assert len(problems) == 1 + ("variance" in sections), problems


def test_wrong_channels_exit_with_status_2_and_one_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe({"name": "diffusers-unet", "config": {**TINY, "in_channels": 3}})))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "in_channels is 3, but the data has 1 channels" in err and "use a config with in_channels: 1" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.safetensors")


def test_config_sources_missing_or_ambiguous(tmp_path, registry):
    assert "needs a config" in _problems({"name": "diffusers-unet"}, registry)[0]
    assert "cannot read" in _problems({"name": "diffusers-unet", "config": str(tmp_path / "none.json")}, registry)[0]
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not valid JSON" in _problems({"name": "diffusers-unet", "config": str(tmp_path / "bad.json")}, registry)[0]
    reference_unet().save_pretrained(tmp_path / "model")
    both = _problems({"name": "diffusers-unet", "config": TINY, "weights": str(tmp_path / "model")}, registry)
    assert "leave it out when denoiser.weights is a save_pretrained directory" in both[0]


def test_missing_diffusers_names_the_extra(monkeypatch, registry):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # ``import diffusers`` now raises ImportError
    problems = _problems({"name": "diffusers-unet", "config": TINY}, registry)
    assert len(problems) == 1 and "pip install 'fundiff[diffusers]'" in problems[0]


def test_shards_under_fsdp_like_the_built_in_networks(registry):
    """diffusers' down and up blocks become FSDP units (distributed.shard_units); sharded
    output, gradients and the unsharded copy agree with the plain network (fundiff.testing)."""
    from fundiff import distributed
    from fundiff.testing import check_fsdp

    network = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry)).model
    assert {type(unit).__name__ for unit in distributed.shard_units(network)} >= {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D"}
    torch.manual_seed(0)
    check_fsdp(network, torch.randn(4, 1, 8, 8), torch.linspace(-5.0, 5.0, 4), torch.tensor([1, -1, 2, 3]))
