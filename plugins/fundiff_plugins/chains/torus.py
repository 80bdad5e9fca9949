"""The flat torus T^D = [-pi, pi)^D of torsional diffusion (Jing et al. 2022, "Torsional
Diffusion for Molecular Conformer Generation", sec. 3; survey sec. 3.2, manifold chains).

State: D angles in [-pi, pi). Brownian motion on the torus for time sigma^2 is the wrapped
Gaussian, x_t = wrap(x0 + sigma eps) with wrap(a) = ((a + pi) mod 2 pi) - pi, whose density
per coordinate, d = wrap(x_t - x0), is

    p_sigma(d) = sum_k N(d + 2 pi k; 0, sigma^2)                              (windings)
               = (1 / 2 pi) (1 + 2 sum_{n>=1} exp(-n^2 sigma^2 / 2) cos(n d))  (Fourier),

the two sides of Poisson summation. The score d/dd log p_sigma is computed from the winding
sum for sigma <= SWITCH_SIGMA and from the Fourier series above it, each truncated where its
terms are negligible:

* windings |k| <= WINDINGS (= 3): with |d| <= pi every left-out term has
  |d + 2 pi k| >= (2|k| - 1) pi, and the k = 0 term is at least exp(-pi^2 / (2 sigma^2)), so
  the score's absolute error is at most
  (4 pi / sigma^2) sum_{m > K} (2m + 1) exp(-2 m (m - 1) pi^2 / sigma^2)
  (``winding_error_bound``; below 1e-24 at the switch sigma = 2, smaller for smaller sigma);
* Fourier terms n <= FOURIER_TERMS (= 5): with rho = exp(-sigma^2 / 2), the denominator is at
  least 1 - 2 rho / (1 - rho) > 0 for sigma >= 2 and the left-out terms are below
  2 sum_{n > N} n rho^(n^2) (``fourier_error_bound``; below 1e-29 at the switch).

The network predicts this score (parameterization ``score``); training is denoising score
matching weighted by sigma^2 (``_manifold.py``). Torsional diffusion divides the squared error
by E||grad log p_sigma||^2 instead; for sigma << pi that expectation is D / sigma^2, so the two
weightings agree up to a constant where the data are not yet uniform.

Prior: uniform on the torus. At the terminal sigma the wrapped Gaussian's density relative to
uniform is 1 + 2 sum_n exp(-n^2 sigma^2 / 2) cos(n d) per coordinate, within
b = 2 sum_n exp(-n^2 sigma^2 / 2) of 1; over D coordinates the perturbed data (a mixture of
such kernels) differ from uniform by at most (1 + b)^D - 1 in relative density: 0.029 for
sigma = pi and D = 2 (torsional diffusion's sigma_max). The recipe check refuses a schedule
whose end leaves more than ``prior_tolerance``.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Level, hookimpl

from ._manifold import ManifoldChain, prior_tolerance_field

#: below this sigma the winding sum, above it the Fourier series
SWITCH_SIGMA = 2.0
#: windings kept: k = -WINDINGS .. WINDINGS
WINDINGS = 3
#: Fourier terms kept: n = 1 .. FOURIER_TERMS
FOURIER_TERMS = 5


def wrap(angles: torch.Tensor) -> torch.Tensor:
    """Angles mapped to [-pi, pi) (the representative of each class mod 2 pi)."""
    wrapped = torch.remainder(angles + math.pi, 2.0 * math.pi) - math.pi
    # remainder of a tiny negative number can round up to 2 pi itself, giving +pi
    return torch.where(wrapped >= math.pi, wrapped - 2.0 * math.pi, wrapped)


def wrapped_normal_score(d: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """d/dd log p_sigma(d) of the wrapped normal, elementwise; ``d`` wrapped to [-pi, pi),
    ``sigma`` broadcastable to it (> 0). Float64 in, float64 out (module docstring)."""
    sigma = torch.as_tensor(sigma, dtype=d.dtype, device=d.device).expand_as(d)
    small = sigma <= SWITCH_SIGMA
    # windings: score = -sum_k (d + 2 pi k) q_k / (sigma^2 sum_k q_k), q_k = exp(-(d + 2 pi k)^2 / (2 sigma^2))
    s_w = torch.where(small, sigma, torch.ones_like(sigma))  # keep the other branch finite
    k = torch.arange(-WINDINGS, WINDINGS + 1, dtype=d.dtype, device=d.device)
    shifted = d[..., None] + 2.0 * math.pi * k
    log_q = -(shifted * shifted) / (2.0 * s_w * s_w)[..., None]
    q = torch.softmax(log_q, dim=-1)  # normalised weights: no underflow for small sigma
    windings = -(q * shifted).sum(-1) / (s_w * s_w)
    # Fourier: score = -2 sum_n n rho^(n^2) sin(n d) / (1 + 2 sum_n rho^(n^2) cos(n d))
    s_f = torch.where(small, torch.full_like(sigma, SWITCH_SIGMA), sigma)
    n = torch.arange(1, FOURIER_TERMS + 1, dtype=d.dtype, device=d.device)
    coef = torch.exp(-0.5 * (n * n) * (s_f * s_f)[..., None])
    nd = n * d[..., None]
    fourier = -2.0 * (n * coef * torch.sin(nd)).sum(-1) / (1.0 + 2.0 * (coef * torch.cos(nd)).sum(-1))
    return torch.where(small, windings, fourier)


def winding_error_bound(sigma: float, windings: int = WINDINGS) -> float:
    """Upper bound on |score - truncated winding sum| for |d| <= pi (module docstring)."""
    total, m = 0.0, windings + 1
    while True:
        term = (2 * m + 1) * math.exp(-2.0 * m * (m - 1) * math.pi**2 / sigma**2)
        total += term
        if term < 1e-20 * total or term == 0.0:
            return 4.0 * math.pi * total / sigma**2
        m += 1


def fourier_error_bound(sigma: float, terms: int = FOURIER_TERMS) -> float:
    """Upper bound on |score - truncated Fourier ratio| (module docstring); needs the
    denominator's lower bound 1 - 2 rho / (1 - rho) to be positive (rho < 1/3: sigma > 1.49)."""
    rho = math.exp(-0.5 * sigma**2)
    floor = 1.0 - 2.0 * rho / (1.0 - rho)
    if floor <= 0.0:
        return math.inf
    tail_num = 2.0 * sum(n * rho ** (n * n) for n in range(terms + 1, terms + 40))
    tail_den = 2.0 * sum(rho ** (n * n) for n in range(terms + 1, terms + 40))
    head_num = 2.0 * sum(n * rho ** (n * n) for n in range(1, terms + 1))
    # |a/b - a'/b'| <= (|a - a'| + |a'/b'| |b - b'|) / b with |a'/b'| <= head_num / floor
    return (tail_num + head_num / floor * tail_den) / floor


def wrapped_normal_uniform_gap(sigma: float) -> float:
    """b = 2 sum_{n>=1} exp(-n^2 sigma^2 / 2): sup |p_sigma(d) 2 pi - 1| on one circle."""
    total, n = 0.0, 1
    while True:
        term = 2.0 * math.exp(-0.5 * n * n * sigma * sigma)
        total += term
        if term < 1e-17 * total:
            return total
        n += 1


@attrs.frozen(kw_only=True)
class Torus(ManifoldChain):
    """Wrapped-Gaussian Brownian motion on the torus [-pi, pi)^D (torsional diffusion); uniform prior."""

    name = "torus"
    prior_tolerance: float = prior_tolerance_field()

    def data_problems(self, components):
        data = components.get("data")
        if data is not None and len(data.spec().shape) != 1:
            message = (
                f"chain 'torus' needs data that are vectors of D angles, but the data set gives shape "
                f"{data.spec().shape}; use a points data set such as torus-mixture"
            )
            return [message]
        return []

    # ---------------------------------------------------------------- data and prior

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Data angles to their representatives in [-pi, pi)."""
        return wrap(x0)

    def retract(self, x: torch.Tensor) -> torch.Tensor:
        return wrap(x)

    def perturb(self, x0, noise, alpha, sigma):
        """x_t = wrap(x0 + sigma eps): an exact draw of the wrapped Gaussian (alpha is 1)."""
        return wrap(x0 + sigma * noise)

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """Uniform angles from standard normal noise: Phi(eps) is uniform on (0, 1)."""
        return self.uniform_state(0.5 * torch.erfc(-noise / math.sqrt(2.0)))

    def uniform_state(self, u: torch.Tensor) -> torch.Tensor:
        return wrap((2.0 * u - 1.0) * math.pi)

    def prior_error_bound(self, sigma: float, state_numel: int) -> float:
        return (1.0 + wrapped_normal_uniform_gap(sigma)) ** state_numel - 1.0

    # ---------------------------------------------------------------- geometry

    def exp_map(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return wrap(x + v)

    def project_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v  # T_x T^D = R^D

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(wrap(x - y).flatten(1), dim=1)

    def manifold_error(self, x: torch.Tensor) -> torch.Tensor:
        below = (-math.pi - x).clamp(min=0.0)
        above = torch.where(x >= math.pi, x - math.pi + torch.finfo(x.dtype).eps, torch.zeros_like(x))
        return torch.maximum(below, above).flatten(1).amax(1)

    # ---------------------------------------------------------------- kernel

    def walk(self, x0: torch.Tensor, sigma: torch.Tensor, noise) -> torch.Tensor:
        """The exact wrapped Gaussian from one draw of noise (draw 0)."""
        eps = noise.sample(0)
        return wrap(x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * eps)

    def kernel_score(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return wrapped_normal_score(wrap(x_t - x0), sigma.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype))


@hookimpl
def fundiff_register_chains(register):
    register("torus", Torus)
