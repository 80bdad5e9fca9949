"""The "simple linear" schedule of Chen 2023, "On the importance of noise scheduling for
diffusion models" (sec. 2, gamma(t) = 1 - t; the survey's Table III, ref. [46]).

The signal variance falls linearly in continuous time: alpha_bar(t) = gamma(t) = 1 - t, so
logSNR(t) = log((1 - t) / t), which is +inf at t = 0 and -inf at t = 1. Chen clips gamma to
[1e-9, 1]; clipping makes the map flat near the ends, so this module instead squeezes gamma
affinely into [c, 1 - c]:

    alpha_bar(t) = c + (1 - 2c) (1 - t),      1 - alpha_bar(t) = c + (1 - 2c) t,

still linear in t, strictly decreasing, with finite ends logSNR(0) = -logSNR(1) =
log((1 - c) / c) (about +-20.7 for the default c = 1e-9). Both alpha_bar and 1 - alpha_bar
are computed directly, so logSNR has no cancellation at either end; the inverse is closed
form: t = (sigmoid(-lambda) - c) / (1 - 2c).
"""

from __future__ import annotations


import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import doc, in_range


@attrs.frozen(kw_only=True)
class SimpleLinear(Schedule):
    """alpha_bar(t) = 1 - t, squeezed into [clip, 1 - clip] so that logSNR stays finite (Chen 2023)."""

    clip: float = attrs.field(
        default=1e-9,
        validator=in_range(0.0, 0.5, low_open=True, high_open=True),
        metadata=doc("c: alpha_bar(1) = c and alpha_bar(0) = 1 - c, so |logSNR| <= log((1 - c) / c)"),
    )

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        c, w = self.clip, 1.0 - 2.0 * self.clip
        return torch.log(c + w * (1.0 - t)) - torch.log(c + w * t)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        return (torch.sigmoid(-logsnr) - self.clip) / (1.0 - 2.0 * self.clip)


@hookimpl
def fundiff_register_schedules(register):
    register("simple-linear", SimpleLinear)
