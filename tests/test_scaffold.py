"""``fundiff new-plugin``: the generated distributions install, register and pass their own tests.

One project per component kind plus one with every kind are generated, built as wheels and
pip-installed (``--no-deps --no-build-isolation``) into a fresh venv that sees this
environment through a ``.pth`` file (the pattern of tests/test_plugin_install.py); their
generated tests then run with pytest in that venv, as generated.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

import fundiff
from fundiff import cli, scaffold
from fundiff.components import KINDS

pytestmark = pytest.mark.slow

TIMEOUT = 600


def _check(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNDIFF_") and k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


NAMES = {kind: f"k-{kind}" for kind in KINDS}  # one project per kind
ALL = "every-kind"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaffold")
    projects = {kind: pathlib.Path(scaffold.new_plugin(name, [kind], str(root / "src"))) for kind, name in NAMES.items()}
    projects[ALL] = pathlib.Path(scaffold.new_plugin(ALL, [], str(root / "src")))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels = root / "wheels"
    _check(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels] + list(projects.values()), cwd=root)
    built = sorted(wheels.glob("*.whl"))
    assert len(built) == len(projects), built
    _check([sys.executable, "-m", "venv", "--without-pip", root / "venv"])
    python = root / "venv" / "bin" / "python"
    purelib = _check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in sorted(ours))
    pathlib.Path(purelib, "_fundiff_test_parent_env.pth").write_text(lines)
    _check([python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index", "-q"] + built, env=_env())
    return python, projects


def test_generated_tests_pass_as_generated(installed, tmp_path):
    """Every kind's example component passes fundiff.testing.check_component (or the smoke
    test of the kinds the kit does not cover), and each project's tiny recipe trains and samples."""
    python, projects = installed
    tests = [str(p / "tests") for p in projects.values()]
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *tests],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=_env(),
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # 2 tests per component (registration, conformance) + 1 recipe test per project
    expected = 2 * (2 * len(KINDS)) + len(projects)
    assert f"{expected} passed" in result.stdout, result.stdout[-2000:]


def test_cli_lists_the_new_components(installed):
    python, projects = installed
    listed = _check([python, "-m", "fundiff", "plugins", "--json"], env=_env())
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    for kind in KINDS:
        for name in (f"{NAMES[kind]}-{kind}", f"{ALL}-{kind}"):
            assert plugins[name]["status"] == "ok", plugins[name]
            assert plugins[name]["components"] == [f"{kind}/{name}"]
        assert plugins[f"{ALL}-{kind}"]["distribution"] == f"fundiff-{ALL}"


def test_existing_target_is_refused_and_untouched(tmp_path, capsys):
    target = tmp_path / "fundiff-taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert cli.main(["new-plugin", "taken", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fundiff-taken"]  # no staging folder left behind


def test_unknown_kind_suggests(tmp_path, capsys):
    assert cli.main(["new-plugin", "oops", "--kind", "schedul", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'schedul'" in err and "did you mean 'schedule'" in err
    assert not any(tmp_path.iterdir())


def test_invalid_name_is_refused(tmp_path, capsys):
    assert cli.main(["new-plugin", "Bad_Name", "--dir", str(tmp_path)]) == 2
    assert "lower case" in capsys.readouterr().err


def test_templates_name_no_registered_design():
    """The core stays generic: no registered component name appears in the templates' text."""
    text = " ".join(" ".join(t.values()) for t in scaffold.TEMPLATES.values()) + scaffold.TEST
    registry = fundiff.Registry.discover()
    words = set(__import__("re").findall(r"[\"'`]([a-z0-9-]+)[\"'`]", text))
    named = {n for kind in KINDS for n in registry.names(kind)} & words
    assert not named, named
