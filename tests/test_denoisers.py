"""The denoiser networks unet, dit and uvit (and mlp's learned-variance head).

Contracts checked here: the output keeps x's shape for every conditioning mode and odd
batch sizes, at finite and infinite logSNR; the zero initialisations the papers prescribe
(ADM's zero convolutions, DiT's adaLN-Zero); class labels change the output and -1 is the
null token; every parameter receives a gradient; the learned-variance interface; recipe
refusals for data the networks cannot take; a few steps of training and sampling on the
8x8 digits. Models are tiny and run in float64 where outputs are compared.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import BuildContext, DataSpec
from fundiff_plugins.denoisers._layers import patchify, unpatchify
from fundiff_plugins.denoisers.dit import DiTBlock
from fundiff_plugins.denoisers.unet import AttentionBlock, ResBlock

IMAGE = DataSpec(shape=(1, 8, 8), num_classes=10, modality="images")
RGB = DataSpec(shape=(3, 8, 4), num_classes=10, modality="images")  # non-square, several channels

UNET = {"channels": 8, "channel_mult": (1, 2), "blocks": 1, "num_groups": 4, "heads": 2, "attention_resolutions": (4,), "embed_dim": 8}
DIT = {"patch_size": 2, "width": 16, "depth": 2, "heads": 2, "embed_dim": 8}
UVIT = {"patch_size": 2, "width": 16, "depth": 3, "heads": 2, "embed_dim": 8}

#: (registry name, parameters): one entry per conditioning mode of each network
CONFIGS = {
    "unet-add": ("unet", {**UNET, "conditioning": "add"}),
    "unet-adagn": ("unet", {**UNET, "conditioning": "adagn", "dropout": 0.1}),
    "unet-cross-attention": ("unet", {**UNET, "conditioning": "cross-attention", "tokens": 3}),
    "unet-concat": ("unet", {**UNET, "conditioning": "concat", "condition_channels": 2}),
    "dit-adaln-zero": ("dit", {**DIT, "conditioning": "adaln-zero"}),
    "dit-cross-attention": ("dit", {**DIT, "conditioning": "cross-attention"}),
    "uvit": ("uvit", UVIT),
    "mlp": ("mlp", {"width": 16, "depth": 2, "embed_dim": 8}),
}
#: the modes that also run without labels
UNCONDITIONAL = ["unet-add", "unet-adagn", "dit-adaln-zero", "uvit", "mlp"]
LOGSNR = [float("-inf"), -7.5, 0.0, 3.0, float("inf")]


def build(registry, key: str, spec: DataSpec = IMAGE, *, conditional: bool = True, seed: int = 0, **extra) -> torch.nn.Module:
    name, params = CONFIGS[key]
    denoiser = registry.resolve("denoiser", name).cls(**params, conditional=conditional, **extra)
    torch.manual_seed(seed)
    return denoiser.build(BuildContext(spec=spec, components={})).double()


def perturbed(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so that layers initialised to zero carry signal (a fresh
    ADM or DiT network outputs zeros whatever its inputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def inputs(batch: int, spec: DataSpec = IMAGE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.shape, generator=generator, dtype=torch.float64)
    logsnr = torch.tensor([LOGSNR[i % len(LOGSNR)] for i in range(batch)], dtype=torch.float64)
    labels = torch.tensor([(3 * i) % 11 - 1 for i in range(batch)])  # -1 and 0..9
    return x, logsnr, labels


@functools.lru_cache(maxsize=None)
def _registry() -> fundiff.Registry:
    return fundiff.Registry.discover()


@functools.lru_cache(maxsize=None)
def _cached(key: str) -> torch.nn.Module:
    """A perturbed conditional model per configuration, built once for the hypothesis tests."""
    return perturbed(build(_registry(), key)).eval()


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_output_keeps_the_input_shape_for_every_conditioning_mode(registry, key, batch):
    """forward(x, logsnr, cond) returns x's shape (the Denoiser contract) for odd batch sizes,
    labels including -1, and logSNR at +-inf (clamped before the sinusoidal embedding)."""
    for spec in (IMAGE, RGB) if key != "mlp" else (IMAGE,):
        model = perturbed(build(registry, key, spec))
        x, logsnr, labels = inputs(batch, spec)
        out = model(x, logsnr, labels)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        assert model(x, logsnr, None).shape == x.shape


@pytest.mark.parametrize("key", UNCONDITIONAL)
def test_unconditional_networks_keep_the_shape(registry, key):
    """Without labels the networks have no label embedding and ignore ``cond``."""
    model = perturbed(build(registry, key, conditional=False)).eval()
    x, logsnr, labels = inputs(3)
    assert not any("class" in n or "context" in n or "condition_image" in n for n, _ in model.named_parameters())
    assert torch.equal(model(x, logsnr, labels), model(x, logsnr, None))
    assert model(x, logsnr).shape == x.shape


def test_concat_takes_an_image_condition_from_python(registry):
    """unet with ``conditioning: concat`` concatenates a float (B, condition_channels, H, W)
    condition along channels as it is (SR3-style), and a different image changes the output."""
    model = _cached("unet-concat")
    x, logsnr, _ = inputs(3)
    image = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a, b = model(x, logsnr, image), model(x, logsnr, image.flip(-1))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_patchify_and_unpatchify_are_inverse():
    """unpatchify(patchify(x)) = x for non-square images with several channels (the token
    layout (row, column) over patches and (p, p, C) inside, as in DiT's unpatchify)."""
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # patch (row 0, col 1)
    assert torch.equal(unpatchify(tokens, 2, 3, 6, 4), x)


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("key", ["dit-adaln-zero", "dit-cross-attention"])
def test_fresh_dit_blocks_are_the_identity(registry, key):
    """adaLN-Zero (Peebles and Xie 2023, sec. 3.2): the regression of (shift, scale, gate) starts
    at zero, so every gate is 0 and each block returns its input exactly (the cross-attention
    branch's output projection starts at zero too); DiT's final modulation and linear layer
    also start at zero, so a fresh network's output is exactly 0, whatever x, lambda, label."""
    model = build(registry, key)
    seen = []

    def check(module, args, output):
        seen.append(torch.equal(output, args[0]))

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, DiTBlock)]
    x, logsnr, labels = inputs(5)
    out = model(x, logsnr, labels)
    for handle in handles:
        handle.remove()
    assert seen == [True] * CONFIGS[key][1]["depth"]
    assert torch.equal(out, torch.zeros_like(x))


def test_fresh_unet_residual_paths_are_the_identity(registry):
    """ADM's initialisation (Dhariwal and Nichol 2021, the zero_module calls): the second
    convolution of every residual block, every attention output projection and the output
    convolution start at zero, so each residual block returns its skip branch, each attention
    block its input, and the network outputs exactly 0."""
    model = build(registry, "unet-cross-attention")
    results = []

    def check(module, args, output):
        expected = module.skip(args[0]) if isinstance(module, ResBlock) else args[0]
        results.append((type(module).__name__, torch.equal(output, expected)))

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    x, logsnr, labels = inputs(3)
    out = model(x, logsnr, labels)
    for handle in handles:
        handle.remove()
    assert {name for name, _ in results} == {"ResBlock", "AttentionBlock"}
    assert all(ok for _, ok in results), results
    assert torch.equal(out, torch.zeros_like(x))


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("key", [k for k in CONFIGS])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_labels_change_the_output_and_minus_one_is_the_null_token(key, data):
    """Class conditioning (survey sec. 5.1): for each sample, the output depends on its own
    label only (per-sample independence of a batch), two different labels give different
    outputs, and the label -1 gives exactly the output of ``cond=None``, the null token that
    classifier-free guidance trains by dropping labels (Ho and Salimans 2022). Compared in
    float64: batched and single-sample evaluation differ by summation order only, ~1e-15
    relative to outputs of order 1, so 1e-10 is a wide margin that a leak between samples
    (an O(1) effect) cannot pass."""
    model = _cached(key)
    batch = data.draw(st.sampled_from([1, 3, 5]), label="batch")
    labels = torch.tensor(data.draw(st.lists(st.integers(-1, 9), min_size=batch, max_size=batch), label="labels"))
    x, logsnr, _ = inputs(batch, seed=data.draw(st.integers(0, 100), label="seed"))
    with torch.no_grad():
        out = model(x, logsnr, labels)
        for i in range(batch):
            alone = model(x[i : i + 1], logsnr[i : i + 1], labels[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=1e-10)
        null = model(x, logsnr, torch.full((batch,), -1))
        torch.testing.assert_close(null, model(x, logsnr, None), rtol=0, atol=0)
        other = model(x, logsnr, (labels + 1 + torch.arange(batch) % 9) % 10)  # a different label 0..9 per sample
        assert ((out - other).flatten(1).abs().amax(1) > 1e-6).all()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("key", list(CONFIGS))
def test_gradients_reach_every_parameter(registry, key):
    """One backward pass of a squared output: at initialisation every parameter gets a
    finite gradient (exactly zero behind the zero-initialised layers); with those layers
    perturbed every parameter gets a nonzero one, so no parameter is dead or detached (which
    would also break DistributedDataParallel without find_unused_parameters)."""
    x, logsnr, labels = inputs(5)
    for model in (build(registry, key, learned_variance=True), perturbed(build(registry, key, learned_variance=True))):
        model.train()
        out, v = model.forward_with_variance(x, logsnr, labels)
        (out.square().sum() + v.square().sum()).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    dead = [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not dead, dead


# ----------------------------------------------------------------------------- learned variance


@pytest.mark.parametrize("key", list(CONFIGS))
def test_learned_variance_head(registry, key):
    """``learned_variance: true`` doubles the output channels (improved DDPM, Nichol and
    Dhariwal 2021, sec. 3.1); forward returns the first half and equals the first part of
    forward_with_variance exactly, the second part has x's shape; without the head the
    variance part is None."""
    x, logsnr, labels = inputs(3)
    model = perturbed(build(registry, key, learned_variance=True)).eval()
    assert model.learned_variance
    out = model(x, logsnr, labels)
    first, v = model.forward_with_variance(x, logsnr, labels)
    assert torch.equal(out, first) and v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(v, out)
    keyword = model(x, logsnr, labels, return_variance=True)
    assert torch.equal(keyword[0], out) and torch.equal(keyword[1], v)
    plain = build(registry, key)
    assert not plain.learned_variance and plain.forward_with_variance(x, logsnr, labels)[1] is None
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra > 0  # the head has its own output weights


# ----------------------------------------------------------------------------- recipes


def _recipe(denoiser: dict, data: dict | str = None) -> dict:
    return {
        "data": data or {"name": "digits"},
        "chain": "vp",
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": denoiser,
        "parameterization": "v",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 3},
        "train": {"steps": 5, "batch_size": 8, "lr": 1e-3, "ema": 0.9, "log_every": 5, "checkpoint_every": 5},
        "sample": {"num_samples": 5, "batch_size": 5},
    }


@pytest.mark.parametrize(
    "denoiser, data, message",
    [
        ({"name": "unet", **UNET}, "two-moons", r"needs image data of shape \(C, H, W\), but the data has shape \(2,\)"),
        ({"name": "dit", **DIT}, "two-moons", r"denoiser 'dit' needs image data"),
        ({"name": "uvit", **UVIT}, {"name": "gmm"}, r"denoiser 'uvit' needs image data"),
        ({"name": "unet", **UNET, "channel_mult": [1, 1, 1, 1, 1]}, None, r"divisible by 16 \(4 halvings"),
        ({"name": "dit", **DIT, "patch_size": 3}, None, r"divisible by 3 \(patch_size 3\)"),
        ({"name": "uvit", **UVIT, "patch_size": 16}, None, r"divisible by 16 \(patch_size 16\).*8x8"),
        ({"name": "unet", **UNET, "attention_resolutions": [16]}, None, r"attention_resolutions \[16\] match no level.*\[8, 4\]"),
        ({"name": "unet", **UNET, "conditioning": "cross-attention"}, None, r"conditioning 'cross-attention'.*conditional: true"),
        ({"name": "unet", **UNET, "conditioning": "concat"}, None, r"conditioning 'concat'.*conditional: true"),
        ({"name": "dit", **DIT, "conditioning": "cross-attention"}, None, r"conditioning 'cross-attention'.*conditional: true"),
        ({"name": "unet", **UNET, "num_groups": 3}, None, r"denoiser: num_groups 3 must divide"),
        ({"name": "dit", **DIT, "heads": 3}, None, r"denoiser: heads 3 must divide width 16"),
        ({"name": "unet", **UNET, "conditioning": "film"}, None, r"denoiser.conditioning: must be one of"),
    ],
    ids=[
        "unet-points", "dit-points", "uvit-points", "unet-levels", "dit-patch", "uvit-patch", "unet-attention",
        "unet-cross-unlabelled", "unet-concat-unlabelled", "dit-cross-unlabelled", "unet-groups", "dit-heads", "unet-mode",
    ],
)
def test_recipes_the_networks_cannot_serve_are_refused_at_load(registry, denoiser, data, message):
    """An image network on data that is not (C, H, W), a size its downsampling or patches do
    not divide, attention at a resolution no level has, a label mode without labels, and
    inconsistent widths are refused when the recipe loads, each with the cause and a fix."""
    with pytest.raises(fundiff.RecipeError, match=message):
        fundiff.load_recipe(_recipe(denoiser, data), registry)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    "denoiser",
    [
        {"name": "unet", **UNET, "conditional": True},
        {"name": "dit", **DIT, "conditional": True, "learned_variance": True},
        {"name": "uvit", **UVIT, "conditional": True},
        {"name": "mlp", "width": 16, "depth": 1, "learned_variance": True},
    ],
    ids=["unet", "dit", "uvit", "mlp"],
)
def test_train_five_steps_and_sample_three_on_digits(tmp_path, registry, denoiser):
    """Each network trains 5 steps on the 8x8 digits (finite losses, the trainer uses the
    mean part of a learned-variance head) and samples 3 DDIM steps to finite images of the
    data's shape, with labels for the conditional ones."""
    pytest.importorskip("sklearn")
    pipeline = fundiff.train(_recipe(denoiser), tmp_path / "run", quiet=True, registry=registry)
    assert pipeline.step == 5
    samples, labels = fundiff.sample(tmp_path / "run", registry=registry, num_samples=5, seed=1)
    assert samples.shape == (5, 1, 8, 8) and torch.isfinite(samples).all()
    assert (labels is not None) == denoiser.get("conditional", False)
