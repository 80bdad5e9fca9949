"""ParaDiGMS: parallel sampling by Picard iteration over a sliding window (Shih et al. 2023,
"Parallel Sampling of Diffusion Models", Algorithm 1), with DDIM (eta = 0) as the base step.

The base step from level t to the less noisy level s is deterministic DDIM, as in ``ddim``:

    f_k(x) = (sigma_s / sigma_t) x + (alpha_s - alpha_t sigma_s / sigma_t) D(x, t)

(onto a clean level, f_k(x) = alpha_s D(x, t)). Sequential sampling computes x_{k+1} =
f_k(x_k) one step after another. ParaDiGMS writes the trajectory in integral form,

    x_{k+1} = x_j + sum_{i=j}^{k} d_i(x_i),      d_i(x) = f_i(x) - x      (paper, eq. 4)

and solves it by Picard iteration over a window of W steps starting at a settled state x_j:
one *sweep* evaluates the drifts d_j .. d_{j+W-1} at the current guesses of x_j .. x_{j+W-1}
and replaces every guess by the cumulative sum above. The W denoiser evaluations of a sweep
read only the previous sweep's guesses, so they are independent of each other: on W devices
or CUDA streams they run at once, and the wall-clock cost is one evaluation per sweep. Here
``denoise`` takes one level per call (the pipeline's contract), so a sweep evaluates its
window in a loop; what the sampler saves is parallel rounds (sweeps), not evaluations.

After a sweep, the window slides past its leading positions whose update was below the
tolerance (paper, Algorithm 1's stride), at least one: x_{j+1} = x_j + d_j(x_j) is exact
once x_j is settled. New positions at the window's end start from the last guess. After p
sweeps from the same start, the first p positions equal the sequential trajectory (by
induction), so tolerance = 0 reproduces sequential DDIM to rounding in at most ``steps``
sweeps, and a smooth ODE converges in far fewer.

Convergence: position k is settled for a sample when the largest change of its guess over
the sample's elements is at most ``tolerance`` times the largest |x_k| of that sample (the
state's own scale, so the test does not depend on the chain's scale). The window slides by
the leading positions settled for every sample in the batch: one window for the batch,
because ``denoise`` takes one level for all samples. A sample's result therefore depends on
its batch (it may get more sweeps than it would alone: more accurate, never less), hence
``couples_batch``; each sample still meets the tolerance. Deciding the stride reads one
integer per sweep back from the device (``.item()``): the only host-device synchronisation,
inherent to a convergence test. The sampler does not use the fused-step executor.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS, check_sampler_inputs
from fundiff.config import at_least, doc
from fundiff.errors import FundiffError


def ddim_coefficients(t, s) -> tuple[float, float]:
    """(a, b) of the deterministic DDIM step x_s = a x_t + b D(x_t, t) (Song et al. 2021, eq. 12, eta = 0)."""
    if s.is_clean:
        return 0.0, s.alpha
    ratio = s.sigma / t.sigma
    return ratio, s.alpha - ratio * t.alpha


@attrs.frozen(kw_only=True)
class ParaDiGMS(Sampler):
    """Picard iteration over a sliding window of DDIM steps; a window's W evaluations are independent."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    #: one window for the whole batch: it slides only past positions settled for every sample
    couples_batch = True
    evaluations_per_step = None  # the sweeps, hence the evaluations, follow the convergence test
    window: int = attrs.field(
        default=8, validator=at_least(1), metadata=doc("W: steps solved together; one sweep evaluates W levels independently")
    )
    tolerance: float = attrs.field(
        default=1e-3,
        validator=at_least(0.0),
        metadata=doc("settled when a sample's largest update is below this times its largest |x|; 0 reproduces sequential DDIM"),
    )
    max_sweeps: int = attrs.field(
        default=1000, validator=at_least(1), metadata=doc("cap on Picard sweeps (parallel rounds); at most steps are ever needed")
    )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        return self._picard(denoise, x, levels, callback)[0]

    def sample_with_sweeps(self, denoise, x, levels, callback=None) -> tuple[torch.Tensor, int]:
        """Like ``sample``, and also the number of sweeps (parallel rounds) it took."""
        check_sampler_inputs(type(self).__name__, denoise, x, levels)
        return self._picard(denoise, x, levels, callback)

    def _picard(self, denoise, x, levels, callback) -> tuple[torch.Tensor, int]:
        steps = len(levels) - 1
        coefficients = [ddim_coefficients(levels[k], levels[k + 1]) for k in range(steps)]
        # guesses[i] is the current guess of x_{start + i}; guesses[0] is settled
        start, guesses, sweeps = 0, [x] * (min(self.window, steps) + 1), 0
        while start < steps:
            if sweeps == self.max_sweeps:
                raise FundiffError(
                    f"paradigms: {self.max_sweeps} Picard sweeps reached with {steps - start} of {steps} steps unsettled; "
                    f"raise max_sweeps (at most steps = {steps} are ever needed) or loosen tolerance={self.tolerance}"
                )
            sweeps += 1
            width = len(guesses) - 1
            # the W evaluations of one sweep: each reads only the previous sweep's guesses
            x0s = [denoise(guesses[i], levels[start + i]) for i in range(width)]
            new = [guesses[0]]
            for i in range(width):
                a, b = coefficients[start + i]
                # eq. 4: x_{k+1} = x_j + sum_i d_i, accumulated left to right so a prefix's sum
                # depends only on that prefix (settled positions reproduce bit for bit)
                drift = (a - 1.0) * guesses[i] + b * x0s[i]
                new.append(new[-1] + drift)
            stride = self._settled_prefix(guesses, new)
            if callback is not None:
                for i in range(stride):
                    callback(start + i, new[i + 1], x0s[i])
            start += stride
            # slide: keep the unsettled guesses, start new positions from the last guess
            keep = new[stride:]
            width = min(self.window, steps - start)
            guesses = (keep + [keep[-1]] * (width + 1 - len(keep)))[: width + 1]
        return guesses[0], sweeps

    def _settled_prefix(self, old: list[torch.Tensor], new: list[torch.Tensor]) -> int:
        """How many leading window positions are settled for every sample, at least one (x_{j+1} is exact)."""
        width = len(new) - 1
        update = torch.stack([(new[i] - old[i]).abs().flatten(1).amax(1) for i in range(1, width + 1)])
        scale = torch.stack([new[i].abs().flatten(1).amax(1) for i in range(1, width + 1)])
        settled = (update <= self.tolerance * scale).all(dim=1)  # (width,): settled for the whole batch
        leading = int(torch.cumprod(settled.to(torch.int64), 0).sum())  # the one sync per sweep
        return max(leading, 1)


@hookimpl
def fundiff_register_samplers(register):
    register("paradigms", ParaDiGMS)
