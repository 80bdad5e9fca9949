"""ControlNet (Zhang et al. 2023, eq. 2): a trainable copy of the frozen U-Net's encoder whose
zero-initialised output convolutions add residuals to the skip connections and the middle
block; the condition here is the 2x2 average-pooled digit (computed from the data)."""

from __future__ import annotations

import fundiff
import pytest
import torch
from fundiff.pipeline import make_predict
from fundiff_plugins.guidances import controlnet as cn

UNET = {"name": "unet", "channels": 8, "channel_mult": [1, 2], "blocks": 1, "num_groups": 4, "heads": 2, "attention_resolutions": [], "embed_dim": 8}


def recipe(**sections) -> dict:
    base = {
        "data": {"name": "digits"},
        "chain": "vp",
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": UNET,
        "parameterization": "v",
        "weighting": {"name": "min-snr", "gamma": 5.0},
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 15},
        "train": {"steps": 60, "batch_size": 64, "lr": 3e-3, "ema": 0.0, "seed": 0},
    }
    base.update(sections)
    return base


def test_zero_initialised_controlnet_is_the_frozen_model(registry, tmp_path):
    """Before training every zero convolution is zero, so the residuals are exact zeros and
    the controlled U-Net's prediction equals the frozen one bit for bit (float64; the frozen
    U-Net's zero-initialised output convolution is randomised first, so the comparison is not
    between two zero outputs). Giving the output convolutions weights changes the prediction
    (the residuals do reach the U-Net)."""
    p = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry))
    p.model.double()
    torch.manual_seed(1)
    torch.nn.init.normal_(p.model.out.weight, std=0.1)
    path = str(tmp_path / "controlnet.safetensors")
    net = cn.train_controlnet(p, steps=0, path=path)
    assert all(float(conv.weight.abs().max()) == 0.0 for conv in net.outputs)
    condition = cn.write_condition(str(tmp_path / "c.safetensors"), cn.coarse(p.data.x[:6]).double())
    predict = make_predict(p.model, p.parameterization)
    guidance = cn.ControlNetGuidance(path=str(tmp_path), condition=condition)
    x = fundiff.rng.normal(3, 1000, 0, torch.arange(6), (1, 8, 8))
    for level in p.levels(5)[:-1]:
        with torch.no_grad():
            assert torch.equal(guidance.start(None).denoise(predict, x, level, None), predict(x, level, None))
    tensors, meta = fundiff.checkpoint.load_checkpoint(path)
    for key in tensors:
        if key.startswith("outputs.") and key.endswith("weight"):
            tensors[key] = 0.1 * torch.randn_like(tensors[key])
    fundiff.checkpoint.save_checkpoint(path, tensors, meta)
    level = p.levels(5)[2]
    with torch.no_grad():
        assert not torch.allclose(guidance.start(None).denoise(predict, x, level, None), predict(x, level, None))


def test_recipe_checks(registry, tmp_path):
    """controlnet needs the unet denoiser, a ControlNet file and a condition file, at load."""
    with pytest.raises(fundiff.RecipeError, match="needs path"):
        fundiff.load_recipe(recipe(guidance={"name": "controlnet", "condition": "x"}), registry)
    with pytest.raises(fundiff.RecipeError, match="needs denoiser 'unet'"):
        fundiff.load_recipe(recipe(denoiser={"name": "mlp", "width": 8}, guidance={"name": "controlnet"}), registry)


@pytest.mark.slow
def test_trained_controlnet_follows_the_coarse_condition(registry, tmp_path):
    """A tiny U-Net (60 steps) and its ControlNet (60 steps) on the 8x8 digits: sampled with
    the coarse versions of 64 digits as conditions, the MSE between each sample's own coarse
    version and its requested condition falls well below the unguided model's (measured:
    unguided 0.261, guided 0.090; with 200 + 100 steps 0.250 and 0.034). Stated bound:
    guided < 0.5 x unguided."""
    p = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry))
    optimizer = torch.optim.AdamW(p.model.parameters(), lr=3e-3)
    for step in range(60):
        loss = p.loss(step, 64)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    p.model.eval()
    net = cn.train_controlnet(p, steps=60, batch_size=64, lr=2e-3, path=str(tmp_path / "controlnet.safetensors"))
    assert float(max(conv.weight.abs().max() for conv in net.outputs)) > 0.0
    wanted = cn.coarse(p.data.x[-64:])
    condition = cn.write_condition(str(tmp_path / "c.safetensors"), wanted)
    errors = {}
    for name, guidance in (("none", registry.build("guidance", "none")),
                           ("controlnet", cn.ControlNetGuidance(path=str(tmp_path), condition=condition))):
        p.recipe.components["guidance"] = guidance
        samples, _ = p.sample(64, seed=1, batch_size=64)
        errors[name] = float(((cn.coarse(samples) - wanted) ** 2).mean())
    assert errors["controlnet"] < 0.5 * errors["none"], errors


def test_train_controlnet_cli_and_sampling_a_run(registry, tmp_path):
    """`fundiff train-controlnet RUN_DIR --steps N` writes RUN_DIR/controlnet.safetensors; the
    run then samples with guidance 'controlnet' (path: the run directory) and a condition
    file, giving finite samples of the data's shape."""
    from fundiff.cli import main

    run = tmp_path / "run"
    fundiff.train(fundiff.load_recipe(recipe(train={"steps": 2, "batch_size": 8, "lr": 1e-3, "ema": 0.0, "seed": 0}), registry), run, quiet=True)
    assert main(["train-controlnet", str(run), "--steps", "2", "-q"]) == 0
    assert (run / "controlnet.safetensors").exists()
    condition = cn.write_condition(str(tmp_path / "c.safetensors"), cn.coarse(torch.zeros(1, 1, 8, 8)))
    p = fundiff.load_run(run, registry=registry, overrides={"guidance.name": "controlnet", "guidance.path": str(run), "guidance.condition": condition})
    samples, _ = p.sample(3, seed=0)
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()
