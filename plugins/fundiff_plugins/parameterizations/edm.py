"""EDM preconditioning (Karras et al. 2022, "Elucidating the design space of diffusion-based
generative models", Table 1 and sec. 5 / app. B.6; survey sec. 4.2.4).

EDM writes the denoiser as D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for the
variance-exploding chain x = x0 + sigma eps. Any Gaussian chain x_t = alpha x0 + sigma eps is
that chain after dividing by alpha: x~ = x_t / alpha, sigma~ = sigma / alpha (EDM eq. 4's
s(t) scaling). With sigma_data = sd:

    c_skip = sd^2 / (sigma~^2 + sd^2),      c_out = sigma~ sd / sqrt(sigma~^2 + sd^2),
    c_in   = 1 / sqrt(sigma~^2 + sd^2)  applied to x~, so input_scale = c_in / alpha,
    c_noise: the network receives the logSNR -2 log sigma~ (EDM's c_noise = log(sigma)/4 is
             an affine map of it, which the network's embedding absorbs).

    D = c_skip x~ + c_out F,   target F = (x0 - c_skip x~) / c_out,   F-MSE = x0-MSE / c_out^2.

Every coefficient is computed without dividing by alpha (multiply through by alpha), so this
parameterization also works at zero terminal SNR: sd^2 alpha / (sigma^2 + alpha^2 sd^2) for
c_skip / alpha, sigma sd / sqrt(sigma^2 + alpha^2 sd^2) for c_out, 1 / sqrt(sigma^2 +
alpha^2 sd^2) for the input scale.

With rho = sigma~ / sd the ideal output is F = (rho x0 / sd - eps) / sqrt(1 + rho^2): it tends to
-eps as rho -> 0 (low noise, or sd -> infinity: eps-prediction) and to x0 / sd as rho -> infinity
(high noise, or sd -> 0: x0-prediction), and with sd = 1 on a VP chain it is exactly -v.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Parameterization, hookimpl
from fundiff.config import doc, greater_than

from ._common import as_tensor


@attrs.frozen(kw_only=True)
class EDMPreconditioning(Parameterization):
    """Karras et al.'s c_skip / c_out / c_in preconditioning, on x~ = x_t / alpha."""

    sigma_data: float = attrs.field(default=0.5, validator=greater_than(0.0), metadata=doc("standard deviation of the data, sigma_data"))

    def _norm2(self, alpha, sigma):
        # alpha^2 (sigma~^2 + sd^2) = sigma^2 + alpha^2 sd^2
        return sigma * sigma + alpha * alpha * self.sigma_data**2

    def _skip_over_alpha(self, alpha, sigma):
        """c_skip / alpha: the coefficient of x_t itself."""
        return self.sigma_data**2 * alpha / self._norm2(alpha, sigma)

    def _c_out(self, alpha, sigma):
        return sigma * self.sigma_data / torch.sqrt(as_tensor(self._norm2(alpha, sigma)))

    def input_scale(self, alpha, sigma):
        return 1.0 / torch.sqrt(as_tensor(self._norm2(alpha, sigma)))

    def target(self, x0, eps, x_t, alpha, sigma):
        # F = (rho x0 / sd - eps) / sqrt(1 + rho^2), rho = sigma~ / sd, times alpha sd / alpha sd:
        # written from (x0, eps) it has no cancellation at low noise (x0 - c_skip x~ has)
        sd = self.sigma_data
        return (sigma * x0 / sd - alpha * sd * eps) / torch.sqrt(as_tensor(self._norm2(alpha, sigma)))

    def to_x0(self, out, x_t, alpha, sigma):
        return self._skip_over_alpha(alpha, sigma) * x_t + self._c_out(alpha, sigma) * out

    def from_x0(self, x0, x_t, alpha, sigma):
        return (x0 - self._skip_over_alpha(alpha, sigma) * x_t) / self._c_out(alpha, sigma)

    def log_x0_mse_factor(self, alpha, sigma):
        return -2.0 * torch.log(self._c_out(as_tensor(alpha), as_tensor(sigma)))


@hookimpl
def fundiff_register_parameterizations(register):
    register("edm", EDMPreconditioning)
