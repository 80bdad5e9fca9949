"""Your own data from a file: an .npz or .safetensors file holding an array of examples.

The file needs an array ``x`` of shape (N, *shape) (points: (N, D); images: (N, C, H, W))
and may hold integer ``labels`` of shape (N,). Safetensors and .npz files are read without
unpickling (``numpy.load(allow_pickle=False)``).
"""

from __future__ import annotations

import os
from typing import Literal, Optional

import attrs
import numpy as np
import torch

from fundiff import Data, DataSet, DataSpec, FundiffError, hookimpl
from fundiff.config import doc


@attrs.frozen(kw_only=True)
class TensorFile(DataSet):
    """Examples read from an .npz or .safetensors file (array 'x', optional 'labels')."""

    path: str = attrs.field(metadata=doc("the .npz or .safetensors file (relative paths: to the working directory)"))
    key: str = attrs.field(default="x", metadata=doc("name of the array of examples"))
    labels_key: Optional[str] = attrs.field(default="labels", metadata=doc("name of the label array, if any"))
    modality: Literal["auto", "points", "images", "one-hot", "one-hot-images"] = attrs.field(
        default="auto",
        metadata=doc(
            "how to draw samples; auto: images for (N, C, H, W), points otherwise; one-hot / one-hot-images: examples "
            "one-hot over classes on their first axis, for categorical chains (pictures of the latter show class indices)"
        ),
    )

    def check_recipe(self, components) -> list[str]:
        if not os.path.exists(self.path):
            return [f"data file not found: {self.path}; give data.path of an .npz or .safetensors file"]
        return []

    def _arrays(self) -> dict:
        if not os.path.exists(self.path):
            raise FundiffError(f"data.path: file not found: {self.path}; give the path of an .npz or .safetensors file")
        try:
            if self.path.endswith(".safetensors"):
                from safetensors.numpy import load_file

                return dict(load_file(self.path))
            with np.load(self.path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise FundiffError(f"data.path: cannot read {self.path} as .npz or .safetensors ({exc})") from None

    def _load(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        arrays = self._arrays()
        if self.key not in arrays:
            raise FundiffError(f"data.key: {self.path} has no array '{self.key}'; it has: {', '.join(arrays) or '(none)'}")
        x = torch.as_tensor(np.asarray(arrays[self.key]), dtype=torch.float32)
        if x.ndim < 2 or x.shape[0] == 0:
            raise FundiffError(f"data: '{self.key}' in {self.path} must have shape (N, *shape) with N >= 1, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise FundiffError(f"data: '{self.key}' in {self.path} holds NaN or Inf values")
        labels = None
        if self.labels_key and self.labels_key in arrays:
            labels = torch.as_tensor(np.asarray(arrays[self.labels_key])).long().reshape(-1)
            if labels.numel() != x.shape[0] or (labels < 0).any():
                raise FundiffError(f"data: '{self.labels_key}' must hold {x.shape[0]} non-negative integers")
        return x, labels

    def spec(self) -> DataSpec:
        x, labels = self._load()
        modality = self.modality if self.modality != "auto" else ("images" if x.ndim == 4 else "points")
        classes = int(labels.max()) + 1 if labels is not None else 0
        return DataSpec(shape=tuple(x.shape[1:]), num_classes=classes, modality=modality)

    def load(self) -> Data:
        x, labels = self._load()
        return Data(x=x, labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("tensor-file", TensorFile)
