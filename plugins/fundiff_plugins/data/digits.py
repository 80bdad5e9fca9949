"""scikit-learn's bundled 8x8 handwritten digits (the UCI optical digits test set, Alpaydin
and Kaynak 1998): 1797 grey images of the digits 0-9, shipped inside scikit-learn, so
nothing is downloaded.

The raw pixel counts 0..16 are scaled linearly to [-1, 1] (x / 8 - 1); each example has shape
(1, size, size) and its digit as its label. ``size`` above 8 upsamples with
``torch.nn.functional.interpolate``: ``bilinear`` (half-pixel centres, ``align_corners=False``;
each output pixel is a convex combination of input pixels, so values stay in [-1, 1]) or
``nearest`` (each pixel repeated, exactly blocky). The data are the same on every call: the
file order of scikit-learn, no shuffling (the trainer draws its batches at random).

scikit-learn is an optional dependency: ``pip install 'fundiff[digits]'``.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, FundiffError, hookimpl
from fundiff.config import at_least, doc, one_of


@attrs.frozen(kw_only=True)
class Digits(DataSet):
    """The 1797 8x8 handwritten digits of scikit-learn, in [-1, 1], with labels 0-9."""

    size: int = attrs.field(default=8, validator=at_least(8), metadata=doc("image side in pixels; above 8 the digits are upsampled"))
    interpolation: str = attrs.field(
        default="bilinear", validator=one_of("bilinear", "nearest"), metadata=doc("upsampling mode when size > 8: bilinear or nearest")
    )

    def spec(self) -> DataSpec:
        return DataSpec(shape=(1, self.size, self.size), num_classes=10, modality="images")

    def load(self) -> Data:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise FundiffError(
                "the digits data set needs scikit-learn, which is not installed; install it with: pip install 'fundiff[digits]'"
            ) from None
        bunch = load_digits()
        pixels = torch.as_tensor(bunch.images, dtype=torch.float64)  # (N, 8, 8), values 0..16
        x = (pixels / 8.0 - 1.0).unsqueeze(1)
        if self.size != 8:
            if self.interpolation == "bilinear":
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            else:
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="nearest")
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        return Data(x=x.float().contiguous(), labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("digits", Digits)
