"""Pictures of samples: a scatter plot for 2-D points, an image grid for images."""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import torch

from .checkpoint import atomic_write_bytes
from .components import DataSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_picture(
    path: str,
    samples: torch.Tensor,
    spec: DataSpec,
    *,
    reference: Optional[torch.Tensor] = None,
    title: str = "",
) -> bool:
    """Write a PNG of ``samples``; returns False when the data has no picture (e.g. 5-D points)."""
    samples, spec = _as_grey_levels(samples, spec)
    if spec.modality == "images" and len(spec.shape) == 3:
        payload = _image_grid(samples, title)
    elif spec.modality == "points" and spec.shape[-1] >= 2:
        payload = _scatter(samples.reshape(samples.shape[0], -1), reference, title)
    else:
        return False
    atomic_write_bytes(path, payload)
    return True


def _as_grey_levels(samples: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, DataSpec]:
    """Images one-hot over K classes along their first axis (modality ``one-hot-images``,
    shape (K, H, W)) as one grey image of their class index: class 0 black (-1), class K - 1
    white (+1); other data unchanged."""
    if spec.modality != "one-hot-images" or len(spec.shape) != 3 or samples.ndim != 4:
        return samples, spec
    k, h, w = spec.shape
    index = samples.float().argmax(1, keepdim=True)
    grey = 2.0 * index / max(k - 1, 1) - 1.0
    return grey, DataSpec(shape=(1, h, w), num_classes=spec.num_classes, modality="images")


def _scatter(samples: torch.Tensor, reference: Optional[torch.Tensor], title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    if reference is not None:
        ref = reference.reshape(reference.shape[0], -1)[:, :2].cpu()
        ax.scatter(ref[:, 0].numpy(), ref[:, 1].numpy(), s=2, c="#bbbbbb", alpha=0.5, label="data", linewidths=0)
    pts = samples[:, :2].cpu()
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, c="#1f5fbf", alpha=0.7, label="samples", linewidths=0)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _image_grid(samples: torch.Tensor, title: str) -> bytes:
    plt = _pyplot()
    count = min(samples.shape[0], 64)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    images = ((samples[:count].float().clamp(-1, 1) + 1) / 2).cpu()
    fig, axes = plt.subplots(rows, columns, figsize=(columns, rows), dpi=100, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            image = images[index]
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image[:3].permute(1, 2, 0).numpy())
    if title:
        fig.suptitle(title, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# Pictures of components (the survey's Tables III and IV)
# --------------------------------------------------------------------------------------


def plot_schedules(path: str, schedules: "list[tuple[str, object]]", chain) -> None:
    """logSNR, alpha^2 (alpha-bar on a VP chain) and sigma against t, one line per schedule."""
    plt = _pyplot()
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    for name, schedule in schedules:
        t_used = t.clamp(min=schedule.t_min)
        logsnr = schedule.logsnr(t_used)
        alpha, sigma = chain.alpha_sigma(logsnr)
        axes[0].plot(t_used.numpy(), logsnr.clamp(-25, 25).detach().numpy(), label=name)
        axes[1].plot(t_used.numpy(), (alpha**2).detach().numpy(), label=name)
        axes[2].plot(t_used.numpy(), sigma.detach().numpy(), label=name)
    for ax, label in zip(axes, ("logSNR lambda(t) (clipped to +-25)", "alpha^2 (alpha-bar on vp)", "sigma")):
        ax.set_xlabel("t")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _test_image(size: int = 32) -> torch.Tensor:
    """A smooth synthetic image in [-1, 1] (a ring and a bar), shape (1, 1, size, size)."""
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    ring = torch.exp(-((x**2 + y**2).sqrt() - 0.6) ** 2 / 0.02)
    bar = ((x.abs() < 0.12) & (y.abs() < 0.5)).float()
    return (2 * (ring + bar).clamp(0, 1) - 1)[None, None]


def plot_noises(path: str, noises: "list[tuple[str, object]]", schedule, chain, levels: "Sequence[float]" = (0.2, 0.4, 0.6, 0.8, 1.0)) -> list[str]:
    """One row per noise type: a histogram of its draws and an image perturbed at several t.

    Returns the names that could not be drawn on a 1x32x32 image, with the reason."""
    from . import rng

    plt = _pyplot()
    image = _test_image()
    skipped: list[str] = []
    rows = []
    for name, noise in noises:
        try:
            stream = rng.NoiseStream(0, torch.arange(64), image.shape[1:], stream=rng.STREAM_PRIOR)
            draws = noise.sample(stream, 0)
            panels = []
            for t in levels:
                logsnr = schedule.logsnr(torch.tensor([max(t, schedule.t_min)], dtype=torch.float64))
                alpha, sigma = chain.alpha_sigma(logsnr)
                eps = noise.sample(rng.NoiseStream(1, torch.arange(1), image.shape[1:], stream=rng.STREAM_PRIOR), 0)
                clean = noise.corrupt(image, logsnr.float())
                panels.append(float(alpha) * clean + float(sigma) * eps)
            rows.append((name, draws.flatten(), panels))
        except Exception as exc:  # noqa: BLE001 - a picture must not fail for one component
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
    if not rows:
        raise ValueError("no noise type could be drawn: " + "; ".join(skipped))
    fig, axes = plt.subplots(len(rows), 1 + len(levels), figsize=(2.2 * (1 + len(levels)), 2.1 * len(rows)), dpi=100, squeeze=False)
    for row, (name, values, panels) in enumerate(rows):
        ax = axes[row][0]
        ax.hist(values.numpy(), bins=60, density=True, color="#1f5fbf")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=6)
        for col, (t, panel) in enumerate(zip(levels, panels), start=1):
            ax = axes[row][col]
            ax.imshow(panel[0, 0].clamp(-3, 3).detach().numpy(), cmap="gray")
            ax.axis("off")
            if row == 0:
                ax.set_title(f"t = {t}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return skipped


def plot_report(path: str, metrics: "list[dict]", samples: torch.Tensor, spec: DataSpec, schedule, chain, title: str, reference: Optional[torch.Tensor] = None) -> None:
    """One PNG: the loss curve, a picture of samples, and the schedule used."""
    plt = _pyplot()
    fig = plt.figure(figsize=(15, 4.6), dpi=100)
    ax = fig.add_subplot(1, 3, 1)
    points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if points:
        steps, losses = zip(*points)
        ax.plot(list(steps), list(losses), color="#1f5fbf")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss", fontsize=9)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 2)
    samples, spec = _as_grey_levels(samples, spec)
    if spec.modality == "images" and len(spec.shape) == 3:
        count = min(samples.shape[0], 36)
        side = math.ceil(math.sqrt(count))
        c, h, w = spec.shape
        canvas = torch.full((c, side * h, side * w), -1.0)
        for i in range(count):
            r, q = divmod(i, side)
            canvas[:, r * h : (r + 1) * h, q * w : (q + 1) * w] = samples[i].float().clamp(-1, 1)
        image = (canvas + 1) / 2
        ax.imshow((image[0] if c == 1 else image[:3].permute(1, 2, 0)).numpy(), cmap="gray" if c == 1 else None)
        ax.axis("off")
    else:
        if reference is not None:
            ref = reference.reshape(reference.shape[0], -1)[:, :2]
            ax.scatter(ref[:, 0].numpy(), ref[:, 1].numpy(), s=2, c="#bbbbbb", alpha=0.5, linewidths=0, label="data")
        pts = samples.reshape(samples.shape[0], -1)[:, :2].cpu()
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, c="#1f5fbf", alpha=0.7, linewidths=0, label="samples")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, markerscale=4)
    ax.set_title("samples", fontsize=9)
    ax = fig.add_subplot(1, 3, 3)
    t = torch.linspace(0.0, 1.0, 501, dtype=torch.float64)
    with torch.no_grad():
        logsnr = schedule.logsnr(t.clamp(min=schedule.t_min))
    ax.plot(t.numpy(), logsnr.clamp(-25, 25).detach().numpy(), color="#1f5fbf")
    ax.set_xlabel("t")
    ax.set_title("schedule: logSNR(t)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
