"""Truncation (survey sec. 5.2.1): start from a partially noised input (image-to-image,
``init`` and ``strength``) and stop early with a final denoise (``sample.stop_logsnr``)."""

from __future__ import annotations

import math

import pytest
import torch

import fundiff
from fundiff import rng
from helpers import oracle_recipe

N = 400


def pipeline(registry, **sections) -> fundiff.Pipeline:
    return fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(**sections), registry))


def test_strength_one_is_ordinary_sampling_when_the_first_level_holds_no_signal(registry):
    """With zero terminal SNR (Lin et al. 2024) the first level has alpha = 0 and sigma = 1, so
    the perturbed init alpha x0 + sigma eps is the prior noise eps itself, bit for bit: strength
    1.0 gives exactly the ordinary samples from the same noise, whatever init is."""
    p = pipeline(registry, schedule="zero-terminal-snr", parameterization="v", sampler={"name": "ddim", "steps": 20})
    assert p.levels()[0].alpha == 0.0 and p.levels()[0].sigma == 1.0
    plain, _ = p.sample(N, seed=3, batch_size=N, dtype=torch.float64)
    init = torch.full((N, 2), 7.0, dtype=torch.float64)
    truncated, _ = p.sample(N, seed=3, batch_size=N, dtype=torch.float64, init=init, strength=1.0)
    assert torch.equal(plain, truncated)


def test_strength_one_starts_from_the_perturbed_init_at_the_first_level(registry):
    """On a schedule with signal left at t = 1 (cosine: alpha_1 ~ 5e-5) strength 1.0 starts at
    the first level from alpha_1 init + sigma_1 eps, with eps sample i's prior noise: the
    sampler's start equals that exactly, and one row of init serves every sample."""
    p = pipeline(registry, schedule="cosine", sampler={"name": "ddim", "steps": 10})
    seen = []
    sampler = p.sampler

    class Spy(type(sampler)):
        def sample(self, denoise, x, levels, noise=None, callback=None):
            seen.append((x.clone(), list(levels)))
            return super().sample(denoise, x, levels, noise, callback)

    spy = Spy(steps=sampler.steps)
    init = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    p.sample(8, seed=5, batch_size=8, dtype=torch.float64, init=init, strength=1.0, sampler=spy)
    x, levels = seen[0]
    first = p.levels()[0]
    eps = rng.NoiseStream(5, torch.arange(8), (2,), stream=rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
    assert levels == p.levels() and torch.equal(x, first.alpha * init.expand(8, 2) + first.sigma * eps)


def test_small_strength_returns_samples_close_to_init(registry):
    """Strength 0.01 with 100 steps starts at t = 0.01 (cosine: sigma / alpha ~ 0.016): the
    noise added to init is N(0, (sigma/alpha)^2) in data units, and the exact denoiser's ODE
    from there moves each point by about that much (plus the pull to its mode's centre,
    bounded by the mode's spread). Asserted: the mean distance to init is below
    3 sqrt(2) sigma/alpha + the mode std 0.15, while ordinary samples are ~2 away."""
    p = pipeline(registry, schedule="cosine", sampler={"name": "ddim", "steps": 100})
    init, _ = p.data_set.draw(N, seed=11)
    init = init.to(torch.float64)
    out, _ = p.sample(N, seed=2, batch_size=N, dtype=torch.float64, init=init, strength=0.01)
    start = p.truncate(p.levels(), 0.01)[0]
    scale = start.sigma / start.alpha
    assert abs(float(p.schedule.t_from_logsnr(torch.tensor(start.logsnr, dtype=torch.float64))) - 0.01) < 1e-9
    distance = (out - init).norm(dim=1).mean()
    assert distance < 3 * math.sqrt(2) * scale + 0.15, (float(distance), scale)
    plain, _ = p.sample(N, seed=2, batch_size=N, dtype=torch.float64)
    assert (plain - init).norm(dim=1).mean() > 10 * distance
    # intermediate strength: start at the nearest grid level, fewer steps
    assert len(p.truncate(p.levels(), 0.5)) == 51


def test_stop_at_returns_the_x0_estimate_at_that_level(registry):
    """sample.stop_logsnr = 0: the sampler walks the levels noisier than lambda = 0, then steps
    to lambda = 0 itself, and the result is the denoiser's x0 estimate there; equal to the
    same computation done by hand with the sampler and make_denoise."""
    p = pipeline(registry, schedule="cosine", sampler={"name": "ddim", "steps": 10}, sample={"stop_logsnr": 0.0})
    out, _ = p.sample(N, seed=4, batch_size=N, dtype=torch.float64)
    stop = p.chain.level(0.0)
    levels = [lvl for lvl in p.levels() if lvl.logsnr < 0.0] + [stop]
    ids = torch.arange(N)
    x = p.chain.prior(levels[0], rng.NoiseStream(4, ids, (2,), stream=rng.STREAM_PRIOR, dtype=torch.float64).normal(0))
    denoise = fundiff.make_denoise(p.model, p.parameterization, p.guidance, None)
    noise = rng.NoiseStream(4, ids, (2,), stream=rng.STREAM_SAMPLER, dtype=torch.float64)
    expected = denoise(p.sampler.sample(denoise, x, levels, noise), stop)
    assert torch.equal(out, expected)
    # the x0 estimate at lambda = 0 is blurrier than the samples: its spread is smaller
    full, _ = p.sample(N, seed=4, batch_size=N, dtype=torch.float64, stop_logsnr=math.inf)
    assert out.var(0).sum() < full.var(0).sum()
    with pytest.raises(fundiff.FundiffError, match="stop_logsnr"):
        p.sample(4, stop_logsnr=-30.0)


def test_cli_samples_from_an_init_file_and_stops_early(registry, tmp_path):
    """fundiff sample RUN --init FILE --strength 0.3 --stop-at 2: one output row per init row,
    equal to Pipeline.sample with the same arguments."""
    from safetensors.torch import load_file, save_file

    from fundiff.cli import main

    run = str(tmp_path / "run")
    fundiff.train(fundiff.load_recipe(oracle_recipe(schedule="cosine", sampler={"name": "ddim", "steps": 10}), registry), run, quiet=True)
    init = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0]])
    save_file({"samples": init}, str(tmp_path / "init.safetensors"))
    out = str(tmp_path / "out")
    assert main(["sample", run, "--init", str(tmp_path / "init.safetensors"), "--strength", "0.3", "--stop-at", "2", "--out", out, "--no-plot", "-q"]) == 0
    samples = load_file(out + ".safetensors")["samples"]
    expected, _ = fundiff.load_run(run, registry=registry).sample(3, init=init, strength=0.3, stop_logsnr=2.0)
    assert samples.shape == (3, 2) and torch.equal(samples, expected)
