"""Gaussian blur as a soft corruption (Daras et al. 2022, "Soft Diffusion: Score Matching for
General Corruptions", eq. 1: x_t = C_t x0 + s_t eta; Bansal et al. 2022, "Cold Diffusion",
sec. 4.1; the frequency-domain blur of Hoogeboom and Salimans 2022, "Blurring Diffusion
Models", sec. 3).

In fundiff's terms the forward process is x_t = alpha C(lambda) x0 + sigma eps, with
(alpha, sigma) from the recipe's chain and eps standard Gaussian (``sample``). The operator
C(lambda) is the heat equation run on the pixel grid for a time tau = w^2 / 2:

    C(lambda) = exp(-tau L),     L = L_H (x) I + I (x) L_W,

where L_H is the Laplacian of a path of H pixels (reflecting borders). The orthonormal
DCT-II diagonalises it, with eigenvalues mu_k = 4 sin^2(pi k / (2 H)), so C is applied as
DCT -> multiply coefficient (k, l) by exp(-tau (mu_k + mu_l)) -> inverse DCT. For blur widths
w larger than about a pixel this is a Gaussian blur of standard deviation w pixels
(mu_k ~ (pi k / H)^2, the Fourier transform of a Gaussian of variance w^2); it is linear,
symmetric, has non-negative weights that sum to one (so it keeps each image's mean and
keeps values inside the image's range), and it is exactly the identity at w = 0. As w grows
every non-constant pattern fades, so a fully blurred image tends to its mean colour.

The blur width rises with the noise level along a ramp that is linear in logSNR:

    w(lambda) = max_blur * clamp((logsnr_start - lambda) / (logsnr_start - logsnr_end), 0, 1)

so C is exactly the identity for lambda >= logsnr_start (the clean level, lambda = +inf,
included) and the strongest blur for lambda <= logsnr_end. The noise type provides
``"corruption-operator"`` and ``"gaussian-noise"`` (``sample`` draws N(0, I)), but not
``"additive-noise"``: samplers that assume x_t = alpha x0 + sigma eps (ddpm, ddim) are refused;
use a sampler that handles the operator (``soft-momentum``).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_NOISE
from fundiff.config import doc, greater_than


def dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): coefficients are D @ x, and D.T @ D = I."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * k * (2.0 * i + 1.0) / (2.0 * n)) * math.sqrt(2.0 / n)
    d[0] = math.sqrt(1.0 / n)
    return d.to(device=device, dtype=dtype)


def path_laplacian_eigenvalues(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Eigenvalues 4 sin^2(pi k / 2n) of the Laplacian of a path of n pixels (DCT-II order)."""
    k = torch.arange(n, dtype=torch.float64)
    return (4.0 * torch.sin(math.pi * k / (2.0 * n)) ** 2).to(device=device, dtype=dtype)


def heat_blur(x: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Blur images ``x`` (B, C, H, W) by exp(-tau L) with tau = width^2 / 2, width (B,) in pixels.

    Written as x + D^T ((a - 1) * (D x D^T)) D so that a width of exactly 0 returns x bit for bit.
    """
    if x.ndim != 4:
        raise ValueError(f"blur needs images shaped (B, C, H, W), got shape {tuple(x.shape)}")
    height, wide = x.shape[-2], x.shape[-1]
    d_h, d_w = dct_matrix(height, x.dtype, x.device), dct_matrix(wide, x.dtype, x.device)
    mu = path_laplacian_eigenvalues(height, x.dtype, x.device)[:, None] + path_laplacian_eigenvalues(wide, x.dtype, x.device)[None, :]
    tau = (0.5 * width.to(x.dtype) ** 2).reshape(-1, 1, 1, 1)
    gain = torch.expm1(-tau * mu)  # a - 1, exact near a = 1
    coeffs = torch.einsum("kh,bchw,lw->bckl", d_h, x, d_w)
    return x + torch.einsum("kh,bckl,lw->bchw", d_h, gain * coeffs, d_w)


def corruption_problems(noise_name: str, components) -> list[str]:
    """Recipe problems shared by the soft corruptions: image data, and a parameterization whose
    x0 estimate does not assume x_t = alpha x0 + sigma eps.

    The probe: the ideal output for x0 = 1 with eps = 0, converted back at x_t = 0 (the clean
    signal fully hidden by the operator), must give x0 again. x0-prediction passes; eps-, v- and
    skip-connection (EDM) parameterizations rebuild x0 from x_t and return C x0, not x0."""
    problems = []
    data = components.get("data")
    if data is not None:
        spec = data.spec()
        if spec.modality != "images" or len(spec.shape) != 3:
            problems.append(
                f"noise '{noise_name}' needs image data shaped (C, H, W), but the data set gives {spec.modality} "
                f"of shape {spec.shape}; use noise 'gaussian'"
            )
    param = components.get("parameterization")
    if param is not None:
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        alpha = sigma = torch.full((1,), math.sqrt(0.5), dtype=torch.float64)
        try:
            out = param.target(one, zero, zero, alpha, sigma)
            ok = bool(torch.allclose(param.to_x0(out, zero, alpha, sigma), one))
        except Exception:  # a parameterization that cannot run the probe: leave it to training
            ok = True
        if not ok:
            problems.append(
                f"noise '{noise_name}' corrupts x0 by an operator, so the network must predict x0 itself: "
                f"parameterization '{type(param).__name__}' rebuilds x0 from x_t as if x_t = alpha x0 + sigma eps; "
                "use parameterization 'x0'"
            )
    return problems


def ramp(logsnr: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """0 for lambda >= start, 1 for lambda <= end, linear in lambda in between (inf-safe)."""
    return ((start - logsnr) / (start - end)).clamp(0.0, 1.0)


@attrs.frozen(kw_only=True)
class Blur(Noise):
    """Heat-equation (Gaussian) blur whose width grows with the noise level, plus Gaussian noise."""

    provides = frozenset({CORRUPTION_OPERATOR, GAUSSIAN_NOISE})
    max_blur: float = attrs.field(default=8.0, validator=greater_than(0.0), metadata=doc("blur width (std, pixels) at and below logsnr_end"))
    logsnr_start: float = attrs.field(default=8.0, metadata=doc("logSNR at and above which the image is not blurred"))
    logsnr_end: float = attrs.field(default=0.0, metadata=doc("logSNR at and below which the blur is max_blur"))

    def __attrs_post_init__(self) -> None:
        if not self.logsnr_end < self.logsnr_start:
            raise ValueError(f"logsnr_end ({self.logsnr_end}) must be < logsnr_start ({self.logsnr_start})")

    def blur_width(self, logsnr: torch.Tensor) -> torch.Tensor:
        """w(lambda) in pixels, monotone non-increasing in lambda, 0 at lambda = +inf."""
        return self.max_blur * ramp(logsnr, self.logsnr_start, self.logsnr_end)

    def check_recipe(self, components) -> list[str]:
        return corruption_problems("blur", components)

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        return stream.normal(draw)

    def corrupt(self, x0: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return heat_blur(x0, self.blur_width(logsnr.to(x0.device)))


@hookimpl
def fundiff_register_noises(register):
    register("blur", Blur)
