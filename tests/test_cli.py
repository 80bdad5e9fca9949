"""The command line: user errors exit with status 2 and one message, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from helpers import RECIPES, ROOT, oracle_recipe


def fundiff(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fundiff", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
        timeout=300,
    )


def user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("fundiff: error: ")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def write_recipe(tmp_path, recipe: dict, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_plugins_json_lists_every_builtin_with_distribution(tmp_path):
    result = fundiff("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["ddim"]["distribution"] == "fundiff" and plugins["ddim"]["components"] == ["sampler/ddim"]
    assert all(p["status"] == "ok" for p in plugins.values())


def test_disabled_plugin_is_listed_and_its_component_unavailable(tmp_path):
    listing = fundiff("-p", "no:ddim", "plugins", "--json")
    assert {p["name"]: p["status"] for p in json.loads(listing.stdout)["plugins"]}["ddim"] == "disabled"
    path = write_recipe(tmp_path, oracle_recipe())
    user_error(fundiff("-p", "no:ddim", "check", path), "sampler.name: unknown sampler 'ddim'")
    user_error(fundiff("check", path, env={"FUNDIFF_DISABLE_PLUGINS": "ddim"}), "unknown sampler 'ddim'")


def test_autoload_off_loads_only_named_plugins():
    result = fundiff("--no-autoload", "-p", "cosine", "plugins", "--json")
    statuses = {p["name"]: p["status"] for p in json.loads(result.stdout)["plugins"]}
    assert statuses["cosine"] == "ok" and statuses["ddim"] == "disabled"


def test_show_lists_parameters_with_types_defaults_and_docs():
    result = fundiff("show", "sampler/ddim", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    eta = {f["name"]: f for f in shown["parameters"]}["eta"]
    assert eta["type"] == "float" and eta["default"] == "0.0" and "deterministic" in eta["doc"]
    user_error(fundiff("show", "sampler/dim"), "did you mean 'ddim'?")
    user_error(fundiff("show", "samplers/ddim"), "write KIND/NAME")


def test_check_reports_every_problem_with_exit_status_2(tmp_path):
    recipe = oracle_recipe(schedule="cosin", sampler={"name": "ddim", "steps": 0})
    user_error(
        fundiff("check", write_recipe(tmp_path, recipe)),
        "2 problems in the recipe",
        "schedule.name: unknown schedule 'cosin'; did you mean 'cosine'?",
        "sampler.steps: must be >= 1, got 0",
    )
    user_error(fundiff("check", str(tmp_path / "missing.yaml")), "recipe file not found")
    user_error(fundiff("check", write_recipe(tmp_path, oracle_recipe()), "--set", "sampler"), "SECTION.KEY=VALUE")


def test_check_resolved_prints_a_loadable_recipe(tmp_path):
    result = fundiff("check", os.path.join(RECIPES, "two-moons.yaml"), "--resolved", "--set", "sampler.steps=7")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sampler"]["steps"] == 7 and resolved["denoiser"]["embed_dim"] == 64


def test_train_and_sample_oracle_run_writes_tensors_and_picture(tmp_path):
    run = str(tmp_path / "run")
    recipe = write_recipe(tmp_path, oracle_recipe())
    assert fundiff("train", recipe, "--run-dir", run, "-q").returncode == 0
    result = fundiff("sample", run, "--steps", "10", "-n", "50", "--seed", "4", "-q")
    assert result.returncode == 0, result.stderr
    written = result.stdout.split()
    assert written == [os.path.join(run, "samples", "ddim-10steps-seed4.safetensors"), os.path.join(run, "samples", "ddim-10steps-seed4.png")]
    from safetensors.torch import load_file

    assert load_file(written[0])["samples"].shape == (50, 2)
    assert open(written[1], "rb").read(4) == b"\x89PNG"
    npz = fundiff("sample", run, "--format", "npz", "-n", "5", "--no-plot", "--out", str(tmp_path / "s"), "-q")
    assert npz.returncode == 0 and npz.stdout.split() == [str(tmp_path / "s.npz")]


def test_sample_errors(tmp_path):
    user_error(fundiff("sample", str(tmp_path / "nowhere")), "run directory not found")
    run = str(tmp_path / "run")
    assert fundiff("train", write_recipe(tmp_path, oracle_recipe()), "--run-dir", run, "-q").returncode == 0
    user_error(fundiff("sample", run, "--sampler", "dpm"), "unknown sampler 'dpm'")
    user_error(fundiff("sample", run, "--set", "denoiser.conditional=true"), "cannot override denoiser.conditional")
    checkpoint = os.path.join(run, "checkpoint.safetensors")
    with open(checkpoint, "r+b") as handle:
        handle.truncate(20)
    user_error(fundiff("sample", run), "truncated or corrupt")


def test_train_refuses_to_overwrite_a_run(tmp_path):
    run = str(tmp_path / "run")
    recipe = write_recipe(tmp_path, oracle_recipe())
    assert fundiff("train", recipe, "--run-dir", run, "-q").returncode == 0
    user_error(fundiff("train", recipe, "--run-dir", run, "-q"), "--resume")
    assert fundiff("train", recipe, "--run-dir", run, "--resume", "-q").returncode == 0  # idempotent
