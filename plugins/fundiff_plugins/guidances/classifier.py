"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs on image
synthesis", sec. 4.1 and Algorithm 2) with a noise-aware classifier p(y | x_t, lambda).

Guidance adds w grad_x log p(y | x_t) to the score of the noisy marginal. For Gaussian
marginals x_t = alpha x0 + sigma eps, Tweedie's formula links the score and the clean
estimate: score = (alpha x0_hat - x_t) / sigma^2, i.e. x0_hat = (x_t + sigma^2 score) /
alpha. Adding w grad log p(y | x_t) to the score therefore moves the clean estimate by

    delta x0 = w sigma^2 / alpha * grad_x log p(y | x_t)

(Algorithm 2's eps_hat - sqrt(1 - alpha_bar) s grad, written for x0; w = 1 samples
p(x | y) when the classifier is exact, larger w sharpens it). The gradient is taken with
autograd inside the no-grad sampling loop (``torch.enable_grad``). Where alpha = 0 (a
zero-terminal-SNR level) there is no finite x0 form and the estimate is left unguided.

The classifier is a small residual MLP on (c_in x_t, sinusoidal embedding of lambda), c_in =
1 / sqrt(alpha^2 + sigma^2), trained with cross-entropy on the recipe's data perturbed by the
recipe's chain, schedule and noise type at t uniform in [t_min, 1] (the levels a uniform
sampling grid visits): :func:`train_classifier`, or ``fundiff train-classifier RUN_DIR``,
which stores ``classifier.safetensors`` in the run directory. Guiding an unconditional
denoiser needs ``label`` (the class to guide towards); with a conditional denoiser the
classifier pushes towards each sample's own label (``sample.label`` or drawn labels).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Optional

import attrs
import torch
from torch import nn

from fundiff import FundiffError, Guidance, hookimpl, rng
from fundiff.checkpoint import load_checkpoint, save_checkpoint
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_MARGINALS, GAUSSIAN_NOISE
from fundiff.config import at_least, doc

#: the file ``fundiff train-classifier RUN_DIR`` writes into the run directory
CLASSIFIER_FILE = "classifier.safetensors"
#: random streams of classifier training (third-party ids, see fundiff.rng)
STREAM_DATA, STREAM_LEVEL, STREAM_NOISE = 1100, 1101, 1102
#: logSNR is clamped before it is embedded (infinite levels embed as finite ones)
_LOGSNR_CLAMP = 50.0


def _embedding(logsnr: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """[cos(lambda w_k), sin(lambda w_k)], w_k geometric from 1 to 1 / max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=logsnr.device, dtype=logsnr.dtype) / half)
    angles = logsnr.clamp(-_LOGSNR_CLAMP, _LOGSNR_CLAMP)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class NoiseAwareClassifier(nn.Module):
    """logits of p(y | x_t, lambda): a residual MLP on the scaled input plus a level embedding."""

    def __init__(self, numel: int, num_classes: int, width: int = 128, depth: int = 2, embed_dim: int = 32):
        super().__init__()
        self.embed_dim = embed_dim
        self.input = nn.Linear(numel, width)
        self.level = nn.Sequential(nn.Linear(embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x_t`` (B, *shape); ``logsnr``, ``alpha``, ``sigma`` (B,). Returns (B, classes) logits."""
        c_in = torch.rsqrt(alpha**2 + sigma**2).to(x_t.dtype)
        h = self.input(x_t.flatten(1) * c_in[:, None]) + self.level(_embedding(logsnr.to(x_t.dtype), self.embed_dim))
        for block in self.blocks:
            h = h + block(h)
        return self.output(h)


# --------------------------------------------------------------------------------------
# Training and storage
# --------------------------------------------------------------------------------------


def train_classifier(
    pipeline,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    width: int = 128,
    depth: int = 2,
    embed_dim: int = 32,
    seed: int = 0,
    path: Optional[str] = None,
    quiet: bool = True,
) -> NoiseAwareClassifier:
    """Train a noise-aware classifier on a :class:`fundiff.Pipeline`'s data and forward
    process (cross-entropy, AdamW, deterministic batches from per-position streams); save it
    to ``path`` (safetensors, with its architecture in the metadata) when given."""
    data, spec = pipeline.data, pipeline.spec
    if spec.num_classes == 0 or data.labels is None:
        raise FundiffError("a classifier needs class labels, and this run's data set has none")
    torch.manual_seed(seed)
    net = NoiseAwareClassifier(spec.numel, spec.num_classes, width, depth, embed_dim).to(pipeline.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    schedule, chain, noise = pipeline.schedule, pipeline.chain, pipeline.noise
    t_min = float(schedule.t_min)
    positions = torch.arange(batch_size)
    losses = []
    for step in range(steps):
        index = (rng.uniform(seed, STREAM_DATA, step, positions) * data.x.shape[0]).long()
        x0, y = data.x[index].to(pipeline.device), data.labels[index].to(pipeline.device)
        t = t_min + (1.0 - t_min) * rng.uniform(seed, STREAM_LEVEL, step, positions).to(torch.float64)
        with torch.no_grad():
            logsnr = schedule.logsnr(t.to(pipeline.device)).to(torch.float64)
            alpha, sigma = chain.alpha_sigma(logsnr)
            stream = rng.NoiseStream(seed, positions, spec.shape, stream=STREAM_NOISE, device=pipeline.device, dtype=x0.dtype)
            eps = noise.sample(stream, step)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            a, s = alpha.to(x0.dtype).reshape(shape), sigma.to(x0.dtype).reshape(shape)
            x_t = chain.perturb(noise.corrupt(x0, logsnr.to(x0.dtype)), eps, a, s)
        logits = net(x_t, logsnr.to(x0.dtype), alpha, sigma)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not quiet and (step + 1) % max(1, steps // 10) == 0:
            print(f"classifier step {step + 1}/{steps}: cross-entropy {sum(losses[-50:]) / len(losses[-50:]):.4f}", file=sys.stderr)
    net.eval().requires_grad_(False)
    if path is not None:
        metadata = {
            "kind": "fundiff-classifier",
            "numel": spec.numel,
            "shape": list(spec.shape),
            "num_classes": spec.num_classes,
            "width": width,
            "depth": depth,
            "embed_dim": embed_dim,
            "steps": steps,
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        }
        save_checkpoint(path, net.state_dict(), metadata)
    return net


def train_classifier_for_run(run_dir: str, *, steps: int = 2000, quiet: bool = True, **options) -> str:
    """``fundiff train-classifier RUN_DIR``: train on the run's recipe, store
    ``RUN_DIR/classifier.safetensors``; returns its path."""
    from fundiff import load_run

    pipeline = load_run(run_dir, device="cpu" if not torch.cuda.is_available() else None)
    path = os.path.join(os.fspath(run_dir), CLASSIFIER_FILE)
    train_classifier(pipeline, steps=steps, path=path, quiet=quiet, **options)
    return path


def resolve_path(path: str) -> str:
    """A classifier file, or a run directory holding ``classifier.safetensors``."""
    return os.path.join(path, CLASSIFIER_FILE) if os.path.isdir(path) else path


def read_metadata(path: str) -> dict:
    """The classifier file's metadata (its safetensors header only; tensors are not read)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    meta = header.get("__metadata__", {}) or {}
    if meta.get("kind") != "fundiff-classifier":
        raise ValueError("not a fundiff classifier file")
    return {key: json.loads(value) if key != "kind" else value for key, value in meta.items() if key not in ("checksum", "format_version")}


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, device: str, dtype: torch.dtype) -> NoiseAwareClassifier:
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "fundiff-classifier":
        raise FundiffError(f"{path} is not a classifier written by fundiff train-classifier")
    net = NoiseAwareClassifier(
        int(meta["numel"]), int(meta["num_classes"]), int(meta["width"]), int(meta["depth"]), int(meta["embed_dim"])
    )
    net.load_state_dict(tensors)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_classifier(path: str, device, dtype: torch.dtype) -> NoiseAwareClassifier:
    """The stored classifier on ``device`` in ``dtype`` (cached while the file is unchanged)."""
    path = os.path.realpath(resolve_path(path))
    return _load(path, os.stat(path).st_mtime_ns, str(device), dtype)


def log_prob_gradient(net: nn.Module, x: torch.Tensor, level, target: torch.Tensor) -> torch.Tensor:
    """grad_x log p(target | x, level), per sample (autograd, also inside a no-grad loop)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        full = lambda value: torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)  # noqa: E731
        logits = net(x_in, full(level.logsnr), full(level.alpha), full(level.sigma))
        log_p = torch.log_softmax(logits, dim=1).gather(1, target.long()[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x_in)
    return grad


# --------------------------------------------------------------------------------------
# The guidance
# --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ClassifierGuidance(Guidance):
    """x0_hat + w sigma^2 / alpha grad log p(y | x_t) with a noise-aware classifier."""

    requires = frozenset({GAUSSIAN_MARGINALS, GAUSSIAN_NOISE})

    path: str = attrs.field(
        default="", metadata=doc("classifier file, or a run directory holding classifier.safetensors (fundiff train-classifier RUN_DIR)")
    )
    scale: float = attrs.field(default=1.0, metadata=doc("w: 1 samples p(x | y) with an exact classifier, larger sharpens"))
    label: Optional[int] = attrs.field(
        default=None, validator=at_least(0), metadata=doc("class to guide towards when the denoiser takes no labels")
    )

    def check_recipe(self, components):
        problems = []
        data, denoiser, noise = components.get("data"), components.get("denoiser"), components.get("noise")
        if noise is not None and CORRUPTION_OPERATOR in type(noise).provides:
            problems.append("guidance 'classifier' needs additive Gaussian noise (Tweedie's formula); this noise type also corrupts x0")
        spec = data.spec() if data is not None else None
        if spec is not None and spec.num_classes == 0:
            return problems + ["guidance 'classifier' needs class labels, and the data set has none; use guidance: none"]
        if spec is not None and denoiser is not None:
            conditional = denoiser.uses_labels(spec)
            if not conditional and self.label is None:
                problems.append("guidance 'classifier' with an unconditional denoiser needs label: the class to guide towards")
            if conditional and self.label is not None:
                problems.append("guidance 'classifier': the denoiser takes labels, so pick the class with sample.label, not guidance.label")
            if self.label is not None and self.label >= spec.num_classes:
                problems.append(f"guidance 'classifier': label must be < {spec.num_classes} (the data's classes), got {self.label}")
        if not self.path:
            return problems + [
                "guidance 'classifier' needs path: a classifier trained with `fundiff train-classifier RUN_DIR` "
                "(then path: RUN_DIR)"
            ]
        file = resolve_path(self.path)
        if not os.path.isfile(file):
            return problems + [
                f"guidance 'classifier': no classifier at {file}; train one with `fundiff train-classifier RUN_DIR` and set path: RUN_DIR"
            ]
        try:
            meta = read_metadata(file)
        except (OSError, ValueError):
            return problems + [f"guidance 'classifier': {file} is not a classifier written by fundiff train-classifier"]
        if spec is not None and (tuple(meta["shape"]) != tuple(spec.shape) or int(meta["num_classes"]) != spec.num_classes):
            problems.append(
                f"guidance 'classifier': {file} was trained on data of shape {tuple(meta['shape'])} with {meta['num_classes']} "
                f"classes, but this recipe's data has shape {tuple(spec.shape)} and {spec.num_classes} classes"
            )
        return problems

    def denoise(self, predict, x, level, cond):
        x0 = predict(x, level, cond)
        if self.scale == 0.0 or not (level.alpha > 0.0 and level.sigma > 0.0):
            return x0
        if cond is None:
            if self.label is None:
                raise ValueError("guidance 'classifier' needs a condition: set guidance.label (the denoiser takes no labels)")
            cond = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
        net = load_classifier(self.path, x.device, x.dtype)
        grad = log_prob_gradient(net, x, level, cond)
        return x0 + (self.scale * level.sigma**2 / level.alpha) * grad.to(x0.dtype)


@hookimpl
def fundiff_register_guidances(register):
    register("classifier", ClassifierGuidance)
