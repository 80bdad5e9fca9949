"""scikit-learn's bundled 8x8 handwritten digits (as ``digits``), binarised for categorical
chains: a pixel is on when its count is at least 8 of 16, and each example is one-hot over
the two classes (off, on) along its first axis, shape (2, 8, 8), with its digit as its label.

The modality is ``one-hot-images``: pictures show the class index of each pixel (off black, on
white). About 32 % of the pixels are on. The data are the same on every call (scikit-learn's
file order). scikit-learn is an optional dependency: ``pip install 'fundiff[digits]'``.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, FundiffError, hookimpl
from fundiff.config import doc, in_range


@attrs.frozen(kw_only=True)
class BinaryDigits(DataSet):
    """The 1797 8x8 digits of scikit-learn thresholded to on/off, one-hot (2, 8, 8), with labels 0-9."""

    threshold: int = attrs.field(
        default=8, validator=in_range(1, 16), metadata=doc("a pixel is on when its count (0..16) is at least this")
    )

    def spec(self) -> DataSpec:
        return DataSpec(shape=(2, 8, 8), num_classes=10, modality="one-hot-images")

    def load(self) -> Data:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise FundiffError(
                "the binary-digits data set needs scikit-learn, which is not installed; install it with: "
                "pip install 'fundiff[digits]'"
            ) from None
        bunch = load_digits()
        on = torch.as_tensor(bunch.images >= self.threshold)  # (N, 8, 8) bool
        x = torch.stack([~on, on], dim=1).float()  # one-hot: channel 0 off, channel 1 on
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        return Data(x=x.contiguous(), labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("binary-digits", BinaryDigits)
