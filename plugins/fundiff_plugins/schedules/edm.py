"""The noise levels of EDM (Karras et al. 2022, "Elucidating the design space of
diffusion-based generative models": sigma(t) = t, Table 1, and the step discretisation of
eq. 5 with exponent rho).

Our t in [0, 1] is mapped onto [sigma_min, sigma_max] = [0.002, 80] (EDM's defaults):

    sigma(t) = ((1 - t) sigma_min^(1/rho) + t sigma_max^(1/rho))^rho,   logSNR = -2 log sigma.

With the default rho = 1 sigma is linear in t (EDM's sigma(t) = t, rescaled); rho = 7 gives
EDM's sampling discretisation (eq. 5) when t is stepped uniformly, which is how fundiff's
samplers step. The (1 - t) a + t b form makes both ends exact: sigma(0) = sigma_min and
sigma(1) = sigma_max. logSNR = -2 log sigma is the variance-exploding reading (alpha = 1);
other chains use the same logSNR values. The inverse is closed form.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class EDM(Schedule):
    """sigma(t) from sigma_min to sigma_max, linear in t for rho = 1 (Karras et al. 2022)."""

    sigma_min: float = attrs.field(default=0.002, validator=greater_than(0.0), metadata=doc("sigma(0)"))
    sigma_max: float = attrs.field(default=80.0, validator=greater_than(0.0), metadata=doc("sigma(1)"))
    rho: float = attrs.field(default=1.0, validator=greater_than(0.0), metadata=doc("sigma^(1/rho) is linear in t; 7 is EDM's sampling grid"))

    def __attrs_post_init__(self) -> None:
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must be > sigma_min ({self.sigma_min})")

    def _ends(self) -> tuple[float, float]:
        return self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        lo, hi = self._ends()
        return (-2.0 * self.rho) * torch.log((1.0 - t) * lo + t * hi)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        lo, hi = self._ends()
        root = torch.exp(logsnr * (-0.5 / self.rho))  # sigma^(1/rho)
        return (root - lo) / (hi - lo)


@hookimpl
def fundiff_register_schedules(register):
    register("edm", EDM)
