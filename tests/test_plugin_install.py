"""Plugins as users get them: real wheels, pip-installed into a fresh virtual environment.

Once per module, the throwaway distributions of ``tests/plugin_fixtures`` and the tutorial
plugin ``docs/example-plugin`` are built as wheels and installed into a new venv. The venv
sees the test environment's site-packages through a ``.pth`` file (torch and the editable
fundiff are not reinstalled), so its entry points are fundiff's built-ins plus the four
new distributions. Each test runs Python in that venv and reads back JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = {
    "fundiff-broken-fixture": ROOT / "tests" / "plugin_fixtures" / "broken",
    "fundiff-clash-a": ROOT / "tests" / "plugin_fixtures" / "clash_a",
    "fundiff-clash-b": ROOT / "tests" / "plugin_fixtures" / "clash_b",
    "fundiff-example": ROOT / "docs" / "example-plugin",
}
TIMEOUT = 300


def _check(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


class Venv:
    def __init__(self, root: pathlib.Path, sources: dict[str, pathlib.Path]):
        self.root = root
        self.sources = sources  # copies of the distributions' sources
        bindir = "Scripts" if os.name == "nt" else "bin"
        self.python = str(root / "venv" / bindir / ("python.exe" if os.name == "nt" else "python"))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUNDIFF_") and k != "PYTHONPATH"}
        env["PYTHONNOUSERSITE"] = "1"
        env.update(extra)
        return env

    def run(self, script: str, **env: str) -> dict:
        """Run a script in the venv; it prints one JSON object on its last line."""
        result = _check([self.python, "-c", textwrap.dedent(script)], env=self.env(**env), cwd=self.root)
        return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    root = tmp_path_factory.mktemp("plugin-install")
    # build from copies, so setuptools' build/ and *.egg-info never land in the repository
    sources = {}
    for dist, source in SOURCES.items():
        sources[dist] = root / "src" / source.name
        shutil.copytree(source, sources[dist], ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _check(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels)] + [str(s) for s in sources.values()])
    built = sorted(wheels.glob("*.whl"))
    assert len(built) == len(SOURCES), built

    _check([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")])
    env = Venv(root, sources)
    purelib = _check([env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # addsitedir (not a bare path line) so that the .pth files there, such as the editable
    # install's finder for fundiff, are processed too
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in sorted(ours))
    pathlib.Path(purelib, "_fundiff_test_parent_env.pth").write_text(lines)
    # pip itself comes from the parent environment through the .pth file
    _check([env.python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index", "-q"] + [str(w) for w in built], env=env.env())
    return env


LIST_PLUGINS = """
    import json, fundiff
    registry = fundiff.Registry.discover()
    print(json.dumps({"plugins": [p.to_json() for p in registry.plugins], "schedules": registry.names("schedule")}))
"""


def by_name(report: dict) -> dict[str, dict]:
    return {p["name"]: p for p in report["plugins"]}


def test_installed_distributions_are_discovered(venv):
    report = by_name(venv.run(LIST_PLUGINS))
    expected = {
        "broken": ("fundiff-broken-fixture", "0.3.1", "fundiff_broken_fixture"),
        "clash-a": ("fundiff-clash-a", "1.0.0", "fundiff_clash_a"),
        "clash-b": ("fundiff-clash-b", "2.0.0", "fundiff_clash_b"),
        "quadratic-logsnr": ("fundiff-example", "0.1.0", "fundiff_example.quadratic_logsnr"),
        "euler-x0": ("fundiff-example", "0.1.0", "fundiff_example.euler_x0"),
    }
    for name, (dist, version, module) in expected.items():
        assert (report[name]["distribution"], report[name]["version"], report[name]["module"]) == (dist, version, module)
    assert report["quadratic-logsnr"]["components"] == ["schedule/quadratic-logsnr"]
    assert report["euler-x0"]["components"] == ["sampler/euler-x0"]
    assert report["cosine"]["distribution"] == "fundiff" and report["cosine"]["status"] == "ok"
    # the example plugin is imported from the venv, not from the source tree
    where = venv.run("import json, fundiff_example; print(json.dumps(fundiff_example.__file__))")
    assert pathlib.Path(where).is_relative_to(venv.root / "venv")


def test_broken_distribution_is_reported_and_builtins_keep_working(venv):
    result = venv.run(
        """
        import json, fundiff
        registry = fundiff.Registry.discover()
        try:
            registry.resolve("sampler", "warp")
            unknown = None
        except fundiff.FundiffError as exc:
            unknown = str(exc)
        recipe = fundiff.load_recipe("%s", registry)
        samples, _ = fundiff.Pipeline(recipe).sample(200, steps=20)
        print(json.dumps({"plugins": [p.to_json() for p in registry.plugins], "unknown": unknown,
                          "finite": bool(samples.isfinite().all()), "shape": list(samples.shape)}))
        """
        % (ROOT / "recipes" / "gmm-oracle.yaml").as_posix()
    )
    plugins = by_name(result)
    broken = plugins["broken"]
    assert broken["status"] == "broken"
    assert (broken["distribution"], broken["version"]) == ("fundiff-broken-fixture", "0.3.1")
    assert 'Error importing plugin "broken": ImportError:' in broken["error"] and "'warpdrive' extension" in broken["error"]
    assert [name for name, p in plugins.items() if p["status"] != "ok"] == ["broken"]
    assert "unknown sampler 'warp'" in result["unknown"]
    assert "Broken plugins that may have provided it: fundiff-broken-fixture:broken" in result["unknown"]
    assert result["finite"] and result["shape"] == [200, 2]


def test_broken_distribution_fails_strict_discovery(venv):
    result = venv.run(
        """
        import json, fundiff
        try:
            fundiff.Registry.discover(strict=True)
            print(json.dumps(None))
        except fundiff.PluginError as exc:
            print(json.dumps(str(exc)))
        """
    )
    assert result is not None and result.startswith('fundiff-broken-fixture 0.3.1: Error importing plugin "broken"')


def test_collision_names_both_distributions_and_qualified_names_work(venv):
    result = venv.run(
        """
        import json, fundiff
        registry = fundiff.Registry.discover()
        try:
            registry.resolve("schedule", "ramp")
            ambiguous = None
        except fundiff.FundiffError as exc:
            ambiguous = str(exc)
        recipe = fundiff.load_recipe("%s", registry, overrides={"schedule.name": "fundiff-clash-b:ramp"})
        samples, _ = fundiff.Pipeline(recipe).sample(200, steps=20)
        print(json.dumps({
            "ambiguous": ambiguous,
            "a": registry.resolve("schedule", "fundiff-clash-a:ramp").cls.__name__,
            "b": registry.resolve("schedule", "clash-b:ramp").cls.__name__,
            "recipe": [type(recipe["schedule"]).__name__, recipe["schedule"].end, recipe.to_dict()["schedule"]["name"]],
            "finite": bool(samples.isfinite().all()),
        }))
        """
        % (ROOT / "recipes" / "gmm-oracle.yaml").as_posix()
    )
    assert "schedule 'ramp' is registered by more than one plugin" in result["ambiguous"]
    assert "fundiff-clash-a 1.0.0" in result["ambiguous"] and "fundiff-clash-b 2.0.0" in result["ambiguous"]
    # entry points come in file-system order, so either may be named first
    assert re.search(r"qualified name: 'fundiff-clash-(a|b):ramp' or 'fundiff-clash-(?!\1)[ab]:ramp'", result["ambiguous"])
    assert (result["a"], result["b"]) == ("RampA", "RampB")
    assert result["recipe"] == ["RampB", -8.0, "fundiff-clash-b:ramp"]
    assert result["finite"]


def test_disable_plugins_environment_variable(venv):
    report = venv.run(LIST_PLUGINS, FUNDIFF_DISABLE_PLUGINS="clash-b,fundiff-broken-fixture")
    plugins = by_name(report)
    assert plugins["clash-b"]["status"] == "disabled" and plugins["clash-b"]["components"] == []
    assert plugins["broken"]["status"] == "disabled" and plugins["broken"]["error"] is None
    assert all(p["status"] == "ok" for name, p in plugins.items() if name not in ("clash-b", "broken"))
    assert report["schedules"].count("ramp") == 1
    ramp = venv.run(
        "import json, fundiff; print(json.dumps(fundiff.Registry.discover().resolve('schedule', 'ramp').cls.__name__))",
        FUNDIFF_DISABLE_PLUGINS="clash-b",
    )
    assert ramp == "RampA"


def test_autoload_off_loads_only_the_listed_plugins(venv):
    report = venv.run(LIST_PLUGINS, FUNDIFF_DISABLE_PLUGIN_AUTOLOAD="1", FUNDIFF_PLUGINS="clash-a,fundiff-example")
    loaded = sorted(name for name, p in by_name(report).items() if p["status"] == "ok")
    assert loaded == ["clash-a", "euler-x0", "quadratic-logsnr"]
    assert report["schedules"] == ["quadratic-logsnr", "ramp"]


EXAMPLE_RUN = """
    import json, sys, fundiff
    recipe = {
        "data": {"name": "gmm", "modes": 8, "radius": 2.0, "std": 0.15},
        "chain": "vp",
        "schedule": {"name": "quadratic-logsnr", "start": 9.0, "end": -9.0, "curvature": 0.4},
        "noise": "gaussian",
        "denoiser": "gmm-oracle",
        "parameterization": "eps",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "euler-x0", "steps": 25},
        "sample": {"num_samples": 1000, "seed": 3},
    }
    registry = fundiff.Registry.discover()
    loaded = fundiff.load_recipe(recipe, registry)
    fundiff.train(loaded, sys.argv[1], quiet=True)
    samples, labels = fundiff.sample(sys.argv[1], num_samples=1000)
    radius = samples.double().norm(dim=1)
    angle = samples.double()[:, 1].atan2(samples.double()[:, 0])
    print(json.dumps({
        "classes": [type(loaded["schedule"]).__module__, type(loaded["sampler"]).__module__],
        "shape": list(samples.shape),
        "finite": bool(samples.isfinite().all()),
        "radius_mean": radius.mean().item(),
        "radius_std": radius.std().item(),
        "angle_mean_resultant": abs(complex(angle.cos().mean().item(), angle.sin().mean().item())),
        "first": samples[:3].tolist(),
    }))
"""


def test_example_plugin_end_to_end(venv, tmp_path):
    """The headline: pip-installed docs/example-plugin's schedule and sampler, named in a recipe."""
    run_dir = tmp_path / "run"
    result = venv.run(EXAMPLE_RUN.replace("sys.argv[1]", repr(str(run_dir))))
    assert result["classes"] == ["fundiff_example.quadratic_logsnr", "fundiff_example.euler_x0"]
    assert result["shape"] == [1000, 2] and result["finite"]
    assert abs(result["radius_mean"] - 2.0) < 0.2  # the ring of 8 modes at radius 2
    assert result["radius_std"] < 0.4  # mode std is 0.15: not a blur over the plane
    assert result["angle_mean_resultant"] < 0.15  # spread around the ring, not collapsed on one mode
    # the run records which distribution provided each component
    recorded = json.loads((run_dir / "plugins.json").read_text())["components"]
    assert recorded["schedule"]["distribution"] == "fundiff-example" and recorded["schedule"]["version"] == "0.1.0"
    assert recorded["sampler"]["distribution"] == "fundiff-example" and recorded["sampler"]["name"] == "euler-x0"
    # deterministic sampler, fixed seeds: a second run gives the same samples
    again = venv.run(EXAMPLE_RUN.replace("sys.argv[1]", repr(str(tmp_path / "again"))))
    assert again["first"] == result["first"]


def test_example_plugin_own_tests_pass_when_installed(venv):
    source = venv.sources["fundiff-example"]
    result = subprocess.run(
        [venv.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=source, env=venv.env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b(1[0-9]|[2-9][0-9]) passed", result.stdout), result.stdout  # all of them ran


def test_cli_sees_installed_plugins(venv):
    """`fundiff plugins` and `fundiff show` in the venv, with `-p no:NAME` disabling one plugin."""
    listed = _check([venv.python, "-m", "fundiff", "-p", "no:clash-b", "plugins", "--json"], env=venv.env(), cwd=venv.root)
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["clash-b"]["status"] == "disabled" and plugins["clash-a"]["status"] == "ok"
    assert plugins["euler-x0"]["distribution"] == "fundiff-example" and plugins["euler-x0"]["status"] == "ok"
    shown = _check([venv.python, "-m", "fundiff", "show", "schedule/quadratic-logsnr"], env=venv.env(), cwd=venv.root).stdout
    assert "fundiff-example 0.1.0" in shown
    assert "logSNR at t = 1 (most noise); below start" in shown  # the field's metadata doc
