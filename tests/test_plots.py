"""`fundiff plot`: pictures of every registered schedule and noise type."""

from __future__ import annotations

from fundiff import plotting
from test_cli import fundiff as run_cli
from test_cli import user_error


def test_plot_every_schedule_and_noise_type(tmp_path, registry):
    chain = registry.build("chain", "vp")
    schedules = [(name, registry.build("schedule", name)) for name in registry.names("schedule")]
    plotting.plot_schedules(str(tmp_path / "s.png"), schedules, chain)
    noises = [(name, registry.build("noise", name)) for name in registry.names("noise")]
    skipped = plotting.plot_noises(str(tmp_path / "n.png"), noises, registry.build("schedule", "cosine"), chain)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"
    # every noise type registered today can be drawn on an image; a skip would hide it from the docs
    assert skipped == []


def test_plot_cli_names_and_errors(tmp_path):
    out = tmp_path / "cos.png"
    result = run_cli("plot", "schedules", "cosine", "linear", "--chain", "vp", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    user_error(run_cli("plot", "schedules", "cosin", "--chain", "vp", "--out", str(out)), "did you mean 'cosine'?")
    user_error(run_cli("plot", "noise", "--chain", "vp", "--out", str(out)), "plot noise needs --schedule")


def test_report_draws_loss_samples_and_schedule(tmp_path):
    from helpers import oracle_recipe
    from test_cli import write_recipe

    run = tmp_path / "run"
    assert run_cli("train", write_recipe(tmp_path, oracle_recipe()), "--run-dir", str(run), "-q").returncode == 0
    result = run_cli("report", str(run), "-n", "200")
    assert result.returncode == 0, result.stderr
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
