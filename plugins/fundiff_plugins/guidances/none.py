"""No guidance: the model's own prediction (for a conditional model, its conditional one)."""

from __future__ import annotations

import attrs

from fundiff import Guidance, hookimpl


@attrs.frozen(kw_only=True)
class NoGuidance(Guidance):
    """Use the denoiser's prediction as it is."""

    def denoise(self, predict, x, level, cond):
        return predict(x, level, cond)


@hookimpl
def fundiff_register_guidances(register):
    register("none", NoGuidance)
