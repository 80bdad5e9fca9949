"""The `digits` data plugin: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import sys

import pytest
import torch

import fundiff

pytest.importorskip("sklearn")

from fundiff_plugins.data.digits import Digits  # noqa: E402


def test_digits_shape_range_labels_and_spec():
    data = Digits().load()
    assert data.x.shape == (1797, 1, 8, 8) and data.x.dtype == torch.float32
    assert data.spec == Digits().spec() and data.spec.modality == "images" and data.spec.num_classes == 10
    # raw counts 0..16 map onto [-1, 1] with both ends attained
    assert float(data.x.min()) == -1.0 and float(data.x.max()) == 1.0
    # the scaling x / 8 - 1 puts every value on the 1/8 grid
    assert torch.equal(data.x * 8, torch.round(data.x * 8))
    assert data.labels.dtype == torch.int64 and data.labels.shape == (1797,)
    counts = torch.bincount(data.labels, minlength=10)
    assert counts.numel() == 10 and int(counts.min()) >= 170  # every digit, roughly balanced


def test_digits_are_deterministic_and_match_scikit_learn():
    from sklearn.datasets import load_digits

    a, b = Digits().load(), Digits().load()
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    raw = load_digits()
    assert torch.equal(a.x[:, 0], torch.as_tensor(raw.images / 8.0 - 1.0, dtype=torch.float32))
    assert torch.equal(a.labels, torch.as_tensor(raw.target))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsampled_digits_keep_range_and_content(mode):
    small = Digits().load().x
    big = Digits(size=16, interpolation=mode).load()
    assert big.x.shape == (1797, 1, 16, 16) and big.spec.shape == (1, 16, 16)
    assert float(big.x.min()) >= -1.0 and float(big.x.max()) <= 1.0
    pooled = torch.nn.functional.avg_pool2d(big.x.double(), 2)
    if mode == "nearest":  # each pixel repeated 2x2: pooling gives the 8x8 digit back
        torch.testing.assert_close(pooled, small.double(), rtol=0, atol=1e-7)
    else:
        # half-pixel bilinear: output pixels 2i, 2i+1 are x_i +- (x_{i+-1} - x_i) / 4, borders
        # clamped, so 2x2 pooling is the separable [1/8, 3/4, 1/8] filter of the 8x8 digit
        padded = torch.nn.functional.pad(small.double(), (1, 1, 1, 1), mode="replicate")
        kernel = torch.tensor([0.125, 0.75, 0.125], dtype=torch.float64)
        expected = torch.nn.functional.conv2d(padded, (kernel[:, None] * kernel[None, :])[None, None])
        torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_recipe_section_validates_size_and_mode(registry):
    with pytest.raises(fundiff.RecipeError, match="data.interpolation"):
        fundiff.load_recipe(_recipe({"name": "digits", "interpolation": "cubic"}), registry)
    with pytest.raises(fundiff.RecipeError, match="data.size"):
        fundiff.load_recipe(_recipe({"name": "digits", "size": 4}), registry)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    with pytest.raises(fundiff.FundiffError, match=r"pip install 'fundiff\[digits\]'"):
        Digits().load()
    assert Digits().spec().shape == (1, 8, 8)  # the spec needs no scikit-learn


def _recipe(data: dict) -> dict:
    return {
        "data": data,
        "chain": "vp",
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": {"name": "mlp", "width": 16, "depth": 1},
        "parameterization": "x0",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": "ddim",
    }
