"""The registry: discovery through entry points, broken plugins, collisions, disabling.

Fast and in-process. Fake distributions are real ``importlib.metadata.PathDistribution``
objects over a ``*.dist-info`` folder written to tmp_path, so their entry points carry a
distribution name and version exactly as installed ones do; the plugin modules they point
at are module objects put in ``sys.modules`` (or the throwaway sources in
``tests/plugin_fixtures``). Real installs are in ``test_plugin_install.py``.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import sys
import types

import attrs
import pytest
import torch

import fundiff
import fundiff.hookspecs
from fundiff.components import KIND_BASES, KINDS
from fundiff.errors import PluginError

FIXTURES = pathlib.Path(__file__).parent / "plugin_fixtures"

BUILTINS = {
    "data": {"two-moons", "gmm"},
    "schedule": {"linear", "cosine"},
    "chain": {"vp"},
    "noise": {"gaussian"},
    "denoiser": {"mlp", "gmm-oracle"},
    "parameterization": {"eps", "x0", "v"},
    "weighting": {"eps-mse"},
    "guidance": {"none"},
    "sampler": {"ddpm", "ddim"},
    "spacing": {"uniform"},
    "variance": {"fixed-small"},
}

#: environment with none of the FUNDIFF_* switches set
CLEAN_ENV: dict[str, str] = {}


# ---------------------------------------------------------------------- helpers


@attrs.frozen(kw_only=True)
class Ramp(fundiff.Schedule):
    """logSNR falling linearly from `start` to `end`."""

    start: float = attrs.field(default=6.0, metadata={"doc": "logSNR at t = 0"})
    end: float = attrs.field(default=-6.0, metadata={"doc": "logSNR at t = 1"})

    def logsnr(self, t):
        return self.start + (self.end - self.start) * torch.as_tensor(t, dtype=torch.float64)

    def t_from_logsnr(self, logsnr):
        return (self.start - torch.as_tensor(logsnr, dtype=torch.float64)) / (self.start - self.end)


@attrs.frozen(kw_only=True)
class OtherRamp(Ramp):
    """Another ramp, to tell two registrations of one name apart."""


def installed_entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group="fundiff"))


def fake_distribution(tmp_path, name: str, version: str, entry_points: dict[str, str]):
    """Entry points of a distribution that exists only as a dist-info folder in tmp_path."""
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[fundiff]\n{lines}")
    eps = list(importlib.metadata.PathDistribution(info).entry_points)
    assert {ep.name for ep in eps} == set(entry_points) and all(ep.dist is not None for ep in eps)
    return eps


def plugin_module(monkeypatch, module_name: str, **hooks) -> types.ModuleType:
    """A plugin module made of the given hook functions, importable as ``module_name``."""
    module = types.ModuleType(module_name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, fundiff.hookimpl(function))
    monkeypatch.setitem(sys.modules, module_name, module)
    return module


def registering(kind_hook: str, *pairs):
    """hooks={kind_hook: function calling register(name, cls) for each pair}."""

    def hook(register):
        for name, cls in pairs:
            register(name, cls)

    return {kind_hook: hook}


def plugin(registry: fundiff.Registry, name: str):
    (info,) = [p for p in registry.plugins if p.name == name]
    return info


@pytest.fixture
def clash(tmp_path, monkeypatch):
    """Two distributions that both register the schedule 'ramp'."""
    plugin_module(monkeypatch, "fx_clash_a", **registering("fundiff_register_schedules", ("ramp", Ramp)))
    plugin_module(monkeypatch, "fx_clash_b", **registering("fundiff_register_schedules", ("ramp", OtherRamp)))
    return fake_distribution(tmp_path, "fx-clash-a", "1.0.0", {"clash-a": "fx_clash_a"}) + fake_distribution(
        tmp_path, "fx-clash-b", "2.5.0", {"clash-b": "fx_clash_b"}
    )


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """A distribution whose module raises ImportError when imported (tests/plugin_fixtures/broken)."""
    monkeypatch.syspath_prepend(str(FIXTURES / "broken"))
    return fake_distribution(tmp_path, "fundiff-broken-fixture", "0.3.1", {"broken": "fundiff_broken_fixture"})


# ---------------------------------------------------------------------- built-ins


@pytest.fixture(scope="module")
def installed() -> fundiff.Registry:
    return fundiff.Registry.discover(environ=CLEAN_ENV)


def test_builtins_come_from_the_installed_entry_points(installed):
    assert set(installed.plugin_manager.get_plugins())  # hooks were registered with pluggy
    version = importlib.metadata.version("fundiff")
    for kind, names in BUILTINS.items():
        assert names <= set(installed.names(kind)), kind
        for name in names:
            entry = installed.resolve(kind, name)
            assert (entry.kind, entry.name) == (kind, name)
            assert entry.distribution == "fundiff" and entry.version == version
            assert issubclass(entry.cls, KIND_BASES[kind]) and attrs.has(entry.cls)
            assert entry.summary  # the first docstring line, shown by listings
            assert installed.resolve(kind, f"fundiff:{name}") is entry
            assert installed.resolve(kind, f"{entry.plugin}:{name}") is entry
            info = plugin(installed, entry.plugin)
            assert info.status == "ok" and info.error is None
            assert (kind, name) in info.components
    ours = [p for p in installed.plugins if p.distribution == "fundiff"]
    assert len(ours) >= sum(len(names) for names in BUILTINS.values())
    assert all(p.status == "ok" for p in ours), [p.to_json() for p in ours if p.status != "ok"]


def test_every_kind_has_a_table(installed):
    assert set(KINDS) == set(BUILTINS)
    for kind in KINDS:
        assert installed.names(kind) == sorted(installed.names(kind))
        assert [e.name for e in installed.entries(kind)] == installed.names(kind)


def test_plugin_info_json(installed):
    data = plugin(installed, "cosine").to_json()
    assert data == {
        "name": "cosine",
        "distribution": "fundiff",
        "version": importlib.metadata.version("fundiff"),
        "module": "fundiff_plugins.schedules.cosine",
        "status": "ok",
        "error": None,
        "components": ["schedule/cosine"],
    }


def test_build_instantiates_with_validated_parameters(installed):
    sampler = installed.build("sampler", "ddim", steps=7, eta=0.5)
    assert (sampler.steps, sampler.eta) == (7, 0.5)
    with pytest.raises(fundiff.RecipeError, match=r"sampler\.steps"):
        installed.build("sampler", "ddim", steps=0)


def test_registries_share_no_state(tmp_path, clash):
    with_clash = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=CLEAN_ENV)
    without = fundiff.Registry.discover(environ=CLEAN_ENV)
    assert "ramp" in with_clash.names("schedule") and "ramp" not in without.names("schedule")
    assert with_clash.plugin_manager is not without.plugin_manager


# ---------------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    "kind, typo, meant",
    [("schedule", "cosin", "cosine"), ("sampler", "ddimm", "ddim"), ("data", "two_moons", "two-moons")],
)
def test_unknown_name_suggests_the_near_match(installed, kind, typo, meant):
    with pytest.raises(fundiff.FundiffError) as err:
        installed.resolve(kind, typo)
    message = str(err.value)
    assert f"unknown {kind} '{typo}'" in message
    assert f"did you mean '{meant}'" in message
    assert "known: " in message and "Broken plugins" not in message


def test_unknown_name_without_near_match_lists_the_known_ones(installed):
    with pytest.raises(fundiff.FundiffError) as err:
        installed.resolve("schedule", "zzzzzz")
    assert str(err.value) == "unknown schedule 'zzzzzz'; known: " + ", ".join(installed.names("schedule"))
    assert {"cosine", "linear"} <= set(installed.names("schedule"))


def test_unknown_kind_suggests_the_near_match(installed):
    with pytest.raises(fundiff.FundiffError, match="unknown component kind 'schedul'; did you mean 'schedule'"):
        installed.resolve("schedul", "cosine")


@pytest.mark.parametrize("bad", ["", None, 3])
def test_name_must_be_a_nonempty_string(installed, bad):
    with pytest.raises(fundiff.FundiffError, match="non-empty string"):
        installed.resolve("schedule", bad)


# ---------------------------------------------------------------------- broken plugins


def test_import_error_marks_only_that_plugin_broken(broken):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + broken, environ=CLEAN_ENV)
    info = plugin(registry, "broken")
    assert info.status == "broken"
    assert (info.distribution, info.version, info.qualified) == ("fundiff-broken-fixture", "0.3.1", "fundiff-broken-fixture:broken")
    assert info.error.startswith('Error importing plugin "broken": ImportError: ')
    assert "'warpdrive' extension" in info.error and "fundiff_broken_fixture.py" in info.error
    assert info.components == [] and registry.broken == [info]
    assert info.to_json()["status"] == "broken" and info.to_json()["error"] == info.error
    # everything else still works, a whole recipe included
    for kind, names in BUILTINS.items():
        for name in names:
            assert registry.resolve(kind, name).distribution == "fundiff"
    recipe = fundiff.load_recipe(pathlib.Path(__file__).parents[1] / "recipes" / "gmm-oracle.yaml", registry)
    assert recipe.names["sampler"] == "ddim"


def test_unknown_name_mentions_the_broken_plugin(broken):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + broken, environ=CLEAN_ENV)
    with pytest.raises(fundiff.FundiffError) as err:
        registry.resolve("sampler", "warp-sampler")
    message = str(err.value)
    assert "unknown sampler 'warp-sampler'" in message
    assert "Broken plugins that may have provided it: fundiff-broken-fixture:broken" in message
    assert "'warpdrive' extension" in message
    # a recipe naming it reports the same, tied to the section
    recipe = fundiff.load_recipe(pathlib.Path(__file__).parents[1] / "recipes" / "gmm-oracle.yaml", registry).to_dict()
    recipe["sampler"] = {"name": "warp-sampler"}
    with pytest.raises(fundiff.RecipeError, match=r"sampler\.name: unknown sampler 'warp-sampler'.*fundiff-broken-fixture"):
        fundiff.load_recipe(recipe, registry)


def test_missing_module_is_broken(tmp_path):
    eps = fake_distribution(tmp_path, "fx-ghost", "0.1", {"ghost": "fx_module_that_does_not_exist"})
    registry = fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV)
    assert plugin(registry, "ghost").status == "broken"
    assert "ModuleNotFoundError" in plugin(registry, "ghost").error


def test_hook_that_raises_is_broken_and_registers_nothing(tmp_path, monkeypatch):
    def fundiff_register_schedules(register):
        register("ramp", Ramp)  # registered before the failure: must not leak into the table
        raise RuntimeError("boom while registering")

    plugin_module(monkeypatch, "fx_raises", fundiff_register_schedules=fundiff_register_schedules)
    plugin_module(monkeypatch, "fx_fine", **registering("fundiff_register_samplers", ("fine", FineSampler)))
    eps = fake_distribution(tmp_path, "fx-raises", "1.0", {"raises": "fx_raises", "fine": "fx_fine"})
    registry = fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV)
    info = plugin(registry, "raises")
    assert info.status == "broken" and info.components == []
    assert 'Error in plugin "raises" while registering components: RuntimeError: boom while registering' in info.error
    assert "ramp" not in registry.names("schedule")
    assert not registry.plugin_manager.is_registered(sys.modules["fx_raises"])
    assert plugin(registry, "fine").status == "ok" and registry.resolve("sampler", "fine").cls is FineSampler
    with pytest.raises(fundiff.FundiffError, match="fx-raises:raises"):
        registry.resolve("schedule", "ramp")


@attrs.frozen(kw_only=True)
class FineSampler(fundiff.Sampler):
    """A sampler that returns its input."""

    def sample(self, denoise, x, levels, noise=None, callback=None):
        return x


class NotAttrs(fundiff.Schedule):
    """A schedule that forgot @attrs.frozen."""

    def logsnr(self, t):
        return t

    def t_from_logsnr(self, logsnr):
        return logsnr


class UndecoratedSampler(fundiff.Sampler):
    """Subclasses the (attrs) Sampler base without @attrs.frozen: its field is not a parameter."""

    eta: float = 0.5

    def sample(self, denoise, x, levels, noise=None, callback=None):
        return x


@pytest.mark.parametrize(
    "hook, pairs, message",
    [
        ("fundiff_register_schedules", [("plain", NotAttrs)], "schedule 'plain' must be an attrs class"),
        ("fundiff_register_samplers", [("undecorated", UndecoratedSampler)], "sampler 'undecorated' must be an attrs class"),
        ("fundiff_register_schedules", [("oops", FineSampler)], "schedule 'oops' must be a subclass of fundiff.Schedule"),
        ("fundiff_register_samplers", [("oops", FineSampler())], "sampler 'oops' must be a subclass of fundiff.Sampler"),
        ("fundiff_register_schedules", [("Ramp", Ramp)], "schedule name 'Ramp' is invalid"),
        ("fundiff_register_schedules", [("my ramp", Ramp)], "schedule name 'my ramp' is invalid"),
        ("fundiff_register_schedules", [("-ramp", Ramp)], "schedule name '-ramp' is invalid"),
        ("fundiff_register_schedules", [("dist:ramp", Ramp)], "schedule name 'dist:ramp' is invalid"),
        ("fundiff_register_schedules", [("", Ramp)], "schedule name '' is invalid"),
        ("fundiff_register_schedules", [(7, Ramp)], "schedule name 7 is invalid"),
        ("fundiff_register_schedules", [("ramp", Ramp), ("ramp", OtherRamp)], "schedule 'ramp' is registered twice by the same plugin"),
    ],
)
def test_contract_violation_is_broken_and_others_keep_working(tmp_path, monkeypatch, hook, pairs, message):
    plugin_module(monkeypatch, "fx_bad", **registering(hook, *pairs))
    plugin_module(monkeypatch, "fx_fine", **registering("fundiff_register_samplers", ("fine", FineSampler)))
    eps = fake_distribution(tmp_path, "fx-bad", "1.0", {"bad": "fx_bad", "fine": "fx_fine"})
    registry = fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV)
    info = plugin(registry, "bad")
    assert info.status == "broken" and info.components == []
    assert 'Error in plugin "bad" while registering components: PluginError: ' in info.error
    assert message in info.error
    assert f"(at {__file__}:" in info.error  # points at the plugin's code, not at fundiff's
    assert registry.names("schedule") == [] and registry.names("sampler") == ["fine"]
    with pytest.raises(PluginError, match=r"fx-bad 1\.0: Error in plugin \"bad\""):
        fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV, strict=True)


def test_same_name_in_two_kinds_is_fine(tmp_path, monkeypatch):
    hooks = registering("fundiff_register_schedules", ("fine", Ramp)) | registering(
        "fundiff_register_samplers", ("fine", FineSampler)
    )
    plugin_module(monkeypatch, "fx_two_kinds", **hooks)
    registry = fundiff.Registry.discover(entry_points=fake_distribution(tmp_path, "fx-two", "1", {"two": "fx_two_kinds"}), environ=CLEAN_ENV)
    assert plugin(registry, "two").status == "ok"
    assert sorted(plugin(registry, "two").components) == [("sampler", "fine"), ("schedule", "fine")]


def test_unknown_hook_name_is_broken(tmp_path, monkeypatch):
    plugin_module(monkeypatch, "fx_typo", fundiff_register_shedules=lambda register: register("ramp", Ramp))
    registry = fundiff.Registry.discover(entry_points=fake_distribution(tmp_path, "fx-typo", "1", {"typo": "fx_typo"}), environ=CLEAN_ENV)
    info = plugin(registry, "typo")
    assert info.status == "broken"
    assert "unknown hook(s) fundiff_register_shedules" in info.error
    assert "fundiff_register_schedules" in info.error  # the known hooks are listed
    assert registry.names("schedule") == []


def test_hookimpl_with_wrong_arguments_is_broken(tmp_path, monkeypatch):
    plugin_module(monkeypatch, "fx_args", fundiff_register_schedules=lambda reg: reg("ramp", Ramp))
    registry = fundiff.Registry.discover(entry_points=fake_distribution(tmp_path, "fx-args", "1", {"args": "fx_args"}), environ=CLEAN_ENV)
    info = plugin(registry, "args")
    assert info.status == "broken" and "reg" in info.error
    assert info.error.startswith('Error registering plugin "args"')


def test_strict_raises_with_every_broken_plugin(tmp_path, monkeypatch, broken):
    plugin_module(monkeypatch, "fx_typo", fundiff_register_shedules=lambda register: None)
    eps = broken + fake_distribution(tmp_path, "fx-typo", "1", {"typo": "fx_typo"})
    with pytest.raises(PluginError) as err:
        fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV, strict=True)
    assert 'fundiff-broken-fixture 0.3.1: Error importing plugin "broken"' in str(err.value)
    assert 'fx-typo 1: Error registering plugin "typo"' in str(err.value)
    assert isinstance(err.value, fundiff.FundiffError)
    # strict without broken plugins is quiet; a disabled broken plugin is not broken
    assert fundiff.Registry.discover(strict=True, environ=CLEAN_ENV).broken == []
    registry = fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV, disabled=["broken", "typo"], strict=True)
    assert [p.status for p in registry.plugins] == ["disabled", "disabled"]


# ---------------------------------------------------------------------- collisions


def test_collision_names_both_distributions(clash):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=CLEAN_ENV)
    assert all(p.status == "ok" for p in registry.plugins)
    with pytest.raises(fundiff.FundiffError) as err:
        registry.resolve("schedule", "ramp")
    message = str(err.value)
    assert "schedule 'ramp' is registered by more than one plugin" in message
    assert "plugin 'clash-a' of fx-clash-a 1.0.0" in message and "plugin 'clash-b' of fx-clash-b 2.5.0" in message
    assert "'fx-clash-a:ramp' or 'fx-clash-b:ramp'" in message
    [group] = registry.conflicts()
    assert [e.distribution for e in group] == ["fx-clash-a", "fx-clash-b"]
    # names nobody else took are unaffected
    assert registry.resolve("schedule", "cosine").distribution == "fundiff"


def test_collision_is_resolved_by_qualified_names(clash):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=CLEAN_ENV)
    assert registry.resolve("schedule", "fx-clash-a:ramp").cls is Ramp
    assert registry.resolve("schedule", "fx-clash-b:ramp").cls is OtherRamp
    assert registry.resolve("schedule", "clash-b:ramp").cls is OtherRamp  # PLUGIN:NAME
    with pytest.raises(fundiff.FundiffError, match="no schedule 'ramp' from 'fx-clash-c'; it is registered by plugin 'clash-a'"):
        registry.resolve("schedule", "fx-clash-c:ramp")
    with pytest.raises(fundiff.FundiffError, match="no schedule 'cosine' from 'fx-clash-a'; it is registered by plugin 'cosine' of fundiff"):
        registry.resolve("schedule", "fx-clash-a:cosine")
    # a recipe keeps the qualified name as written
    recipe = fundiff.load_recipe(pathlib.Path(__file__).parents[1] / "recipes" / "gmm-oracle.yaml", registry).to_dict()
    recipe["schedule"] = {"name": "fx-clash-b:ramp", "end": -7.0}
    loaded = fundiff.load_recipe(recipe, registry)
    assert type(loaded["schedule"]) is OtherRamp and loaded["schedule"].end == -7.0
    assert loaded.to_dict()["schedule"]["name"] == "fx-clash-b:ramp"
    assert loaded.plugin_versions()["schedule"]["distribution"] == "fx-clash-b"


def test_collision_with_a_builtin(tmp_path, monkeypatch):
    plugin_module(monkeypatch, "fx_cosine", **registering("fundiff_register_schedules", ("cosine", Ramp)))
    eps = installed_entry_points() + fake_distribution(tmp_path, "fx-cosine", "3.0", {"my-cosine": "fx_cosine"})
    registry = fundiff.Registry.discover(entry_points=eps, environ=CLEAN_ENV)
    with pytest.raises(fundiff.FundiffError, match="'fundiff:cosine' or 'fx-cosine:cosine'"):
        registry.resolve("schedule", "cosine")
    assert registry.resolve("schedule", "fundiff:cosine").cls.__module__ == "fundiff_plugins.schedules.cosine"
    assert registry.resolve("schedule", "fx-cosine:cosine").cls is Ramp


def test_distribution_visible_twice_is_loaded_once(clash):
    registry = fundiff.Registry.discover(entry_points=clash + clash, environ=CLEAN_ENV)
    assert [p.name for p in registry.plugins] == ["clash-a", "clash-b"]
    assert registry.broken == [] and len(registry.conflicts()) == 1


# ---------------------------------------------------------------------- disabling


@pytest.mark.parametrize("block", ["clash-b", "fx-clash-b:clash-b", "fx-clash-b"])
def test_disable_by_plugin_qualified_or_distribution_name(clash, block):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=CLEAN_ENV, disabled=[block])
    info = plugin(registry, "clash-b")
    assert info.status == "disabled" and info.disabled and info.components == []
    assert plugin(registry, "clash-a").status == "ok"
    assert registry.resolve("schedule", "ramp").cls is Ramp
    assert registry.conflicts() == [] and registry.broken == []


def test_disable_by_environment_variable(clash):
    environ = {"FUNDIFF_DISABLE_PLUGINS": " clash-a , cosine,not-installed"}
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=environ)
    assert plugin(registry, "clash-a").status == "disabled" and plugin(registry, "cosine").status == "disabled"
    assert registry.resolve("schedule", "ramp").cls is OtherRamp
    assert "cosine" not in registry.names("schedule") and {"linear", "ramp"} <= set(registry.names("schedule"))
    with pytest.raises(fundiff.FundiffError, match="unknown schedule 'cosine'"):
        registry.resolve("schedule", "cosine")


def test_disabling_the_distribution_disables_every_builtin(clash):
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ={"FUNDIFF_DISABLE_PLUGINS": "fundiff"})
    assert {p.status for p in registry.plugins if p.distribution == "fundiff"} == {"disabled"}
    assert registry.names("sampler") == [] and registry.names("schedule") == ["ramp"]


def test_disabled_broken_plugin_is_not_imported(broken):
    registry = fundiff.Registry.discover(entry_points=broken, environ={"FUNDIFF_DISABLE_PLUGINS": "broken"})
    assert plugin(registry, "broken").status == "disabled" and registry.broken == []
    assert plugin(registry, "broken").error is None  # never imported


def test_in_process_plugins_can_be_disabled(monkeypatch):
    module = plugin_module(monkeypatch, "fx_inline", **registering("fundiff_register_samplers", ("fine", FineSampler)))
    loaded = fundiff.Registry.discover(entry_points=[], environ=CLEAN_ENV, plugins=[("inline", module)])
    assert loaded.resolve("sampler", "inline:fine").distribution is None
    blocked = fundiff.Registry.discover(entry_points=[], environ={"FUNDIFF_DISABLE_PLUGINS": "inline"}, plugins=[("inline", module)])
    assert plugin(blocked, "inline").status == "disabled" and blocked.names("sampler") == []


def test_autoload_off_loads_only_the_named_plugins(clash):
    environ = {"FUNDIFF_DISABLE_PLUGIN_AUTOLOAD": "1", "FUNDIFF_PLUGINS": "clash-a,fundiff:cosine"}
    registry = fundiff.Registry.discover(entry_points=installed_entry_points() + clash, environ=environ)
    loaded = sorted(p.name for p in registry.plugins if p.status == "ok")
    assert loaded == ["clash-a", "cosine"]
    assert all(p.status == "disabled" for p in registry.plugins if p.name not in loaded)
    assert registry.names("schedule") == ["cosine", "ramp"] and registry.names("sampler") == []
    assert registry.resolve("schedule", "ramp").cls is Ramp


def test_autoload_off_by_argument_with_enabled(clash):
    registry = fundiff.Registry.discover(
        entry_points=installed_entry_points() + clash, environ=CLEAN_ENV, autoload=False, enabled=["fx-clash-b"]
    )
    assert [p.name for p in registry.plugins if p.status == "ok"] == ["clash-b"]
    # the argument wins over the environment
    forced = fundiff.Registry.discover(entry_points=clash, environ={"FUNDIFF_DISABLE_PLUGIN_AUTOLOAD": "1"}, autoload=True)
    assert [p.status for p in forced.plugins] == ["ok", "ok"]


@pytest.mark.parametrize("value, autoload", [("1", False), ("true", False), ("yes", False), ("0", True), ("false", True), ("", True)])
def test_autoload_switch_values(clash, value, autoload):
    registry = fundiff.Registry.discover(entry_points=clash, environ={"FUNDIFF_DISABLE_PLUGIN_AUTOLOAD": value})
    assert all(p.status == ("ok" if autoload else "disabled") for p in registry.plugins)


def test_disable_wins_over_enable(clash):
    environ = {"FUNDIFF_DISABLE_PLUGIN_AUTOLOAD": "1", "FUNDIFF_PLUGINS": "clash-a,clash-b", "FUNDIFF_DISABLE_PLUGINS": "clash-a"}
    registry = fundiff.Registry.discover(entry_points=clash, environ=environ)
    assert [(p.name, p.status) for p in registry.plugins] == [("clash-a", "disabled"), ("clash-b", "ok")]


def test_environment_is_read_from_os_environ_by_default(clash, monkeypatch):
    monkeypatch.setenv("FUNDIFF_DISABLE_PLUGINS", "clash-b")
    monkeypatch.delenv("FUNDIFF_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry = fundiff.Registry.discover(entry_points=clash)
    assert [(p.name, p.status) for p in registry.plugins] == [("clash-a", "ok"), ("clash-b", "disabled")]


# ---------------------------------------------------------------------- the plugin guide

GUIDE = pathlib.Path(__file__).parents[1] / "docs" / "writing-a-plugin.md"


def test_guide_quotes_the_real_example_plugin():
    """docs/writing-a-plugin.md shows the code of docs/example-plugin verbatim (which
    test_plugin_install.py builds, installs and runs)."""
    text = GUIDE.read_text()
    quotes = re.findall(r"<!-- quoted from (docs/example-plugin/\S+) -->\n```\w*\n(.*?)\n```", text, re.S)
    quoted_files = {path for path, _ in quotes}
    assert {
        "docs/example-plugin/pyproject.toml",
        "docs/example-plugin/src/fundiff_example/quadratic_logsnr.py",
        "docs/example-plugin/src/fundiff_example/euler_x0.py",
    } <= quoted_files
    for path, block in quotes:
        source = (pathlib.Path(__file__).parents[1] / path).read_text()
        assert block in source, f"the guide's quote of {path} is out of date:\n{block}"
    # every hook the guide registers through is a real one
    for hook in re.findall(r"def (fundiff_register_\w+)\(register\)", text):
        assert hook in fundiff.hookspecs.HOOK_KINDS


def test_guide_documents_every_hook():
    text = GUIDE.read_text()
    documented = re.findall(r"^### `(fundiff_\w+)\(register\)`$", text, re.M)
    assert documented == list(fundiff.hookspecs.HOOK_KINDS)


def test_guide_names_real_testing_helpers():
    testing = pytest.importorskip("fundiff.testing")
    named = set(re.findall(r"`(check_\w+)", GUIDE.read_text())) - {"check_recipe"}  # that one is a Component method
    assert {"check_component", "check_schedule", "check_sampler"} <= named
    assert not [name for name in named if not hasattr(testing, name)]
