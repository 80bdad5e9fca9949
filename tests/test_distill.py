"""Knowledge distillation: progressive (Salimans and Ho 2022) and one-step (Luhman and Luhman 2021)."""

from __future__ import annotations

import itertools
import json
import os

import fundiff
import pytest
import torch
from fundiff import noiselevel
from fundiff.cli import main
from fundiff.distill import distill, first_order_step, x0_for_step
from helpers import RECIPES, oracle_recipe, sliced_wasserstein
from hypothesis import given
from hypothesis import strategies as st

N = 1000  # samples compared, seed 0 (the distillers train on other draws)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, registry):
    """A tiny two-moons MLP trained 300 steps, sampled with 8 deterministic DDIM steps."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml"), registry).to_dict()
    recipe["data"]["n"] = 2000
    recipe["denoiser"].update(width=32, depth=2)
    recipe["sampler"] = {"name": "ddim", "steps": 8, "eta": 0.0}
    recipe["train"].update(steps=300, batch_size=128, warmup=20, ema=0.9)
    run = tmp_path_factory.mktemp("distill") / "teacher"
    fundiff.train(fundiff.load_recipe(recipe, registry), run, quiet=True)
    return run


@given(
    st.floats(-8, 8), st.floats(0.05, 6), st.booleans(),
    st.lists(st.floats(-3, 3), min_size=6, max_size=6),
)
def test_the_target_x0_makes_one_step_land_on_the_two_step_result(logsnr_t, gap, to_clean, values):
    """Salimans and Ho, Algorithm 2: the x0 solved from x_t and x_t'' makes the deterministic
    first-order step t -> t'' (x_s = alpha_s x0 + sigma_s eps) land exactly on x_t'', also when
    t'' is the clean level (sigma = 0). float64; the solve divides by
    alpha_t'' - (sigma_t''/sigma_t) alpha_t >= alpha_t'' (1 - e^{-gap/2}) on the vp chain, so the
    tolerance scales with that conditioning."""
    chain_t = noiselevel.vp_alpha_sigma(logsnr_t)
    chain_s = (1.0, 0.0) if to_clean else noiselevel.vp_alpha_sigma(logsnr_t + gap)
    x_t = torch.tensor(values[:3], dtype=torch.float64)
    x_s = torch.tensor(values[3:], dtype=torch.float64)
    x0 = x0_for_step(x_t, x_s, *chain_t, *chain_s)
    landed = first_order_step(x_t, x0, *chain_t, *chain_s)
    denominator = chain_s[0] - chain_s[1] / chain_t[1] * chain_t[0]
    scale = float(x_t.abs().max() + x_s.abs().max()) + 1.0
    assert torch.allclose(landed, x_s, rtol=0, atol=1e-12 * scale / denominator), (landed, x_s)


def test_two_core_steps_equal_the_ddim_sampler(registry):
    """The teacher's step in the distiller is DDIM with eta = 0 (Song et al. eq. 12): two core
    first-order steps on the gmm oracle equal the 'ddim' sampler walking the same three
    levels, to float64 round-off."""
    pipeline = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(), registry))
    chain = pipeline.chain
    levels = [chain.level(-2.0), chain.level(0.5), chain.level(3.0)]
    denoise = fundiff.pipeline.make_denoise(pipeline.model.double(), pipeline.parameterization, pipeline.guidance)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = registry.build("sampler", "ddim", eta=0.0).sample(denoise, x, levels)
    y = x
    for t, s in itertools.pairwise(levels):
        y = first_order_step(y, denoise(y, t), t.alpha, t.sigma, s.alpha, s.sigma)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_progressive_round_beats_the_teacher_at_half_the_steps(teacher, tmp_path):
    """Salimans and Ho, Algorithm 2: after one round from 8 to 4 steps, the student's 4-step
    samples are closer (sliced Wasserstein, same prior noise) to the teacher's 8-step samples
    than the teacher's own 4-step samples. Measured: teacher 4 vs 8 about 0.094, student about
    0.006; the assertion asks for half of the teacher's distance."""
    out = tmp_path / "progressive"
    code = main(["distill", str(teacher), "--method", "progressive", "--out", str(out),
                 "--steps-per-round", "150", "--eval-samples", "256", "-q"])
    assert code == 0
    report = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    assert [(r["teacher_steps"], r["steps"]) for r in report] == [(8, 4)]
    assert report[0]["sliced_wasserstein"] > 0 and report[0]["run_sliced_wasserstein"] > 0
    run = fundiff.load_run(teacher)
    reference, _ = run.sample(N, seed=0)
    own, _ = run.sample(N, seed=0, steps=4)
    student = fundiff.load_run(out)
    assert student.sampler.steps == 4 and student.recipe.names["sampler"] == "ddim"
    distilled, _ = student.sample(N, seed=0)
    teacher_gap, student_gap = sliced_wasserstein(own, reference), sliced_wasserstein(distilled, reference)
    assert student_gap < 0.5 * teacher_gap, (student_gap, teacher_gap)


@pytest.mark.slow
def test_one_step_student_beats_the_teachers_single_step(teacher, tmp_path):
    """Luhman and Luhman 2021: a student regressed on the teacher's deterministic samples from
    their prior noise (held-out seed) maps x_T to x0 in one call far better than the teacher's
    own one step. Measured: teacher 1 vs 8 steps about 0.72, student about 0.025; the assertion
    asks for a fifth of the teacher's distance."""
    out = tmp_path / "one-step"
    report = distill(teacher, out, method="one-step", steps_per_round=200, pairs=512, eval_samples=256, quiet=True)
    assert [(r["teacher_steps"], r["steps"]) for r in report] == [(8, 1)]
    run = fundiff.load_run(teacher)
    reference, _ = run.sample(N, seed=0)
    own, _ = run.sample(N, seed=0, steps=1)
    student = fundiff.load_run(out)
    assert student.sampler.steps == 1
    distilled, _ = fundiff.sample(str(out), num_samples=N, seed=0)
    teacher_gap, student_gap = sliced_wasserstein(own, reference), sliced_wasserstein(distilled, reference)
    assert student_gap < 0.2 * teacher_gap, (student_gap, teacher_gap)


@pytest.mark.slow
def test_bad_input_exits_2(teacher, tmp_path, capsys):
    """A missing run, an unknown method, an oracle without parameters, and a step count that
    does not halve exit with status 2 and a message naming the cause."""
    assert main(["distill", str(tmp_path / "nope"), "--method", "progressive", "--out", str(tmp_path / "a")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["distill", str(teacher), "--method", "two-step", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "invalid choice: 'two-step'" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--method", "progressive", "--rounds", "4", "--out", str(tmp_path / "c"), "-q"]) == 2
    assert "divisible by 16" in capsys.readouterr().err
    oracle = tmp_path / "oracle"
    fundiff.train(oracle_recipe(), oracle, quiet=True)
    assert main(["distill", str(oracle), "--method", "one-step", "--out", str(tmp_path / "d")]) == 2
    assert "no parameters to distill" in capsys.readouterr().err
