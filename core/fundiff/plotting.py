"""Pictures of samples: a scatter plot for 2-D points, an image grid for images."""

from __future__ import annotations

import io
import math
from typing import Optional

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
    if spec.modality == "images" and len(spec.shape) == 3:
        payload = _image_grid(samples, title)
    elif spec.modality == "points" and spec.shape[-1] >= 2:
        payload = _scatter(samples.reshape(samples.shape[0], -1), reference, title)
    else:
        return False
    atomic_write_bytes(path, payload)
    return True


def _scatter(samples: torch.Tensor, reference: Optional[torch.Tensor], title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    if reference is not None:
        ref = reference.reshape(reference.shape[0], -1)[:, :2].cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="#bbbbbb", alpha=0.5, label="data", linewidths=0)
    pts = samples[:, :2].cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="#1f5fbf", alpha=0.7, label="samples", linewidths=0)
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
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image[:3].permute(1, 2, 0))
    if title:
        fig.suptitle(title, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
