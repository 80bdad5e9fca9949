"""A labelled point data set with its class label appended as features, so a model can
diffuse data and label jointly (survey sec. 3.2.2: "label vectors are perturbed and learned
jointly with data"; e.g. a ``product`` chain with one part for the point and one for the label).

Example i becomes (x_i, y_i) with y_i the signed one-hot code of its label: +scale in the
label's channel and -scale in the others (the +-1 code of analog bits, Chen, Zhang and Hinton
2023, applied to a one-hot label: the values sit at the unit scale of standardised data). A sampled label is the argmax
over the label channels. The result is unlabelled (num_classes 0): the label is data now.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl
from fundiff.config import doc, greater_than
from fundiff.errors import FundiffError
from fundiff_plugins.data.two_moons import TwoMoons


@attrs.frozen(kw_only=True)
class WithLabels(DataSet):
    """A labelled point data set with its label appended as a signed one-hot code."""

    base: DataSet = attrs.field(factory=TwoMoons, metadata=doc("the labelled point data set (a nested data section)"))
    scale: float = attrs.field(
        default=1.0,
        validator=greater_than(0.0),
        metadata=doc("magnitude of the label code: +scale for the class, -scale elsewhere"),
    )

    def _base_spec(self) -> DataSpec:
        spec = self.base.spec()
        if spec.num_classes < 2 or len(spec.shape) != 1:
            raise FundiffError(
                f"data 'with-labels' appends the label to points of shape (D,) and needs at least 2 classes; "
                f"the base data has shape {tuple(spec.shape)} and {spec.num_classes} classes: use a labelled point data set (e.g. two-moons, gmm)"
            )
        return spec

    def spec(self) -> DataSpec:
        base = self._base_spec()
        return DataSpec(shape=(base.shape[0] + base.num_classes,), num_classes=0, modality=base.modality)

    def label_channels(self) -> tuple[int, int]:
        """[start, stop) of the label code on axis 1."""
        base = self._base_spec()
        return base.shape[0], base.shape[0] + base.num_classes

    def load(self) -> Data:
        base = self._base_spec()
        data = self.base.load()
        if data.labels is None:
            raise FundiffError("data 'with-labels': the base data set loaded no labels")
        code = torch.full((data.x.shape[0], base.num_classes), -self.scale, dtype=torch.float32)
        code.scatter_(1, data.labels[:, None], self.scale)
        return Data(x=torch.cat([data.x, code], dim=1), spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("with-labels", WithLabels)
