"""The registry: discovers plugins, builds one table of components per kind.

Plugins are loaded from the entry-point group ``fundiff`` of installed distributions (never
from arbitrary paths). Each entry point is loaded on its own: one that fails to import,
fails pluggy's validation or raises inside a registration hook is recorded as broken, with
its distribution, version and error, and the others keep working; the error is raised only
when a recipe asks for a component that broken plugin might have provided, or under
``strict``.

Disabling follows pytest: ``FUNDIFF_DISABLE_PLUGINS=a,b`` (or ``-p no:a`` on the command
line) blocks plugins by entry-point name, qualified name ``DIST:NAME`` or distribution
name; ``FUNDIFF_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the plugins named in
``FUNDIFF_PLUGINS=a,b`` (or ``-p a``).

Every registry owns a fresh ``pluggy.PluginManager``; there is no module-level state.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import inspect
import os
import re
import traceback
from typing import Any, Iterable, Mapping, Optional, Sequence

import attrs
import pluggy

from . import hookspecs
from .components import KIND_BASES, KINDS, Component
from .errors import FundiffError, PluginError, suggest

ENTRY_POINT_GROUP = "fundiff"
ENV_DISABLE = "FUNDIFF_DISABLE_PLUGINS"
ENV_NO_AUTOLOAD = "FUNDIFF_DISABLE_PLUGIN_AUTOLOAD"
ENV_ENABLE = "FUNDIFF_PLUGINS"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@attrs.frozen
class ComponentEntry:
    """One registered component: its kind, name, class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: Optional[str]
    version: Optional[str]

    @property
    def origin(self) -> str:
        if self.distribution:
            return f"plugin '{self.plugin}' of {self.distribution} {self.version}"
        return f"plugin '{self.plugin}'"

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


@attrs.define
class PluginInfo:
    """A plugin the registry saw: loaded, broken or disabled."""

    name: str
    distribution: Optional[str]
    version: Optional[str]
    value: str  # "module" or "module:object"
    components: list[tuple[str, str]] = attrs.Factory(list)
    error: Optional[str] = None
    disabled: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.distribution}:{self.name}" if self.distribution else self.name

    @property
    def status(self) -> str:
        return "disabled" if self.disabled else ("broken" if self.error else "ok")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.value,
            "status": self.status,
            "error": self.error,
            "components": [f"{kind}/{name}" for kind, name in self.components],
        }


def _split_env(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _env_true(value: Optional[str]) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def _format_exception(exc: BaseException) -> str:
    # point at the plugin's code, not at the register() callback that raised for it
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    last = frames[-1:]
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Registry:
    """Tables of components by kind, built once from the installed plugins.

    Use :meth:`discover`; look components up with :meth:`resolve` and instantiate them with
    :meth:`build`. The registry never calls a hook after construction.
    """

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._table: dict[str, dict[str, list[ComponentEntry]]] = {kind: {} for kind in KINDS}

    # ---------------------------------------------------------------- construction

    @classmethod
    def discover(
        cls,
        *,
        disabled: Sequence[str] = (),
        enabled: Sequence[str] = (),
        autoload: Optional[bool] = None,
        plugins: Iterable[tuple[str, object]] = (),
        entry_points: Optional[Iterable[importlib_metadata.EntryPoint]] = None,
        environ: Optional[Mapping[str, str]] = None,
        strict: bool = False,
    ) -> "Registry":
        """Build a registry from installed plugins.

        :param disabled: plugin names to block, on top of ``FUNDIFF_DISABLE_PLUGINS``.
        :param enabled: plugin names to load when autoload is off, on top of ``FUNDIFF_PLUGINS``.
        :param autoload: load every entry point (default: unless
            ``FUNDIFF_DISABLE_PLUGIN_AUTOLOAD`` is set).
        :param plugins: extra in-process plugins as ``(name, module_or_object)`` pairs.
        :param entry_points: use these instead of the installed ``fundiff`` group (tests).
        :param strict: raise :class:`PluginError` if any plugin is broken.
        """
        env = os.environ if environ is None else environ
        blocked = set(_split_env(env.get(ENV_DISABLE))) | set(disabled)
        wanted = set(_split_env(env.get(ENV_ENABLE))) | set(enabled)
        if autoload is None:
            autoload = not _env_true(env.get(ENV_NO_AUTOLOAD))
        registry = cls()
        if entry_points is None:
            entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen: set[tuple[Optional[str], str]] = set()

        def order(ep: importlib_metadata.EntryPoint) -> tuple[str, str]:
            dist = getattr(ep, "dist", None)
            return (dist.metadata["Name"] if dist is not None else "", ep.name)

        # a stable order: listings and collision messages read the same on every machine
        for ep in sorted(entry_points, key=order):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            key = (dist_name, ep.name)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            info = PluginInfo(ep.name, dist_name, version, ep.value)
            names = {ep.name, info.qualified} | ({dist_name} if dist_name else set())
            if names & blocked or (not autoload and not names & wanted):
                info.disabled = True
                registry.plugins.append(info)
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure marks the plugin broken
                info.error = f'Error importing plugin "{ep.name}": {_format_exception(exc)}'
                registry.plugins.append(info)
                continue
            registry._add(info, obj)
        for name, obj in plugins:
            info = PluginInfo(name, None, None, getattr(obj, "__name__", repr(obj)))
            if name in blocked:
                info.disabled = True
                registry.plugins.append(info)
                continue
            registry._add(info, obj)
        if strict and registry.broken:
            raise PluginError(
                "\n".join(f"{p.distribution} {p.version}: {p.error}" if p.distribution else p.error or "" for p in registry.broken)
            )
        return registry

    def _add(self, info: PluginInfo, obj: object) -> None:
        self.plugins.append(info)
        pm = self.plugin_manager
        try:
            pm.register(obj, name=info.qualified)
            callers = pm.get_hookcallers(obj) or []
            unknown = [hc.name for hc in callers if not hc.has_spec()]
            if unknown:
                known = ", ".join(hookspecs.HOOK_KINDS)
                raise PluginError(f"implements unknown hook(s) {', '.join(unknown)}; known hooks: {known}")
            for caller in callers:
                for impl in caller.get_hookimpls():
                    if impl.plugin is obj and "register" not in impl.argnames:
                        raise PluginError(f"hook {caller.name} must take the 'register' argument")
        except Exception as exc:  # noqa: BLE001
            info.error = f'Error registering plugin "{info.name}": {exc}'
            if pm.is_registered(obj):
                pm.unregister(obj)
            return
        added: list[ComponentEntry] = []
        try:
            for hook_name, kind in hookspecs.HOOK_KINDS.items():
                for impl in getattr(pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is obj:
                        impl.function(register=self._register_callback(info, kind, added))
        except Exception as exc:  # noqa: BLE001
            info.error = f'Error in plugin "{info.name}" while registering components: {_format_exception(exc)}'
            pm.unregister(obj)
            return
        for entry in added:
            self._table[entry.kind].setdefault(entry.name, []).append(entry)
            info.components.append((entry.kind, entry.name))

    def _register_callback(self, info: PluginInfo, kind: str, added: list[ComponentEntry]):
        base = KIND_BASES[kind]

        def register(name: str, component_class: type) -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise PluginError(
                    f"{kind} name {name!r} is invalid: use lower-case letters, digits, '.', '-' or '_'"
                )
            if not (isinstance(component_class, type) and issubclass(component_class, base)):
                raise PluginError(
                    f"{kind} '{name}' must be a subclass of fundiff.{base.__name__}, got {component_class!r}"
                )
            # attrs.has() is also true for an undecorated subclass of an attrs class (such as
            # fundiff.Sampler), whose own annotated fields would silently not be parameters
            if not attrs.has(component_class) or "__attrs_attrs__" not in vars(component_class):
                raise PluginError(f"{kind} '{name}' must be an attrs class (decorate it with @attrs.frozen)")
            if inspect.isabstract(component_class):
                missing = ", ".join(sorted(component_class.__abstractmethods__))
                raise PluginError(f"{kind} '{name}' does not implement {missing}")
            if any(e.kind == kind and e.name == name for e in added):
                raise PluginError(f"{kind} '{name}' is registered twice by the same plugin")
            added.append(ComponentEntry(kind, name, component_class, info.name, info.distribution, info.version))

        return register

    # ---------------------------------------------------------------- queries

    @property
    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def names(self, kind: str) -> list[str]:
        """Registered component names of a kind (ambiguous ones included), sorted."""
        self._check_kind(kind)
        return sorted(self._table[kind])

    def entries(self, kind: str) -> list[ComponentEntry]:
        self._check_kind(kind)
        return [e for name in sorted(self._table[kind]) for e in self._table[kind][name]]

    def conflicts(self) -> list[list[ComponentEntry]]:
        """Names registered by more than one plugin."""
        return [entries for kind in KINDS for entries in self._table[kind].values() if len(entries) > 1]

    def _check_kind(self, kind: str) -> None:
        if kind not in self._table:
            raise FundiffError(f"unknown component kind '{kind}'; {suggest(kind, KINDS)}kinds: {', '.join(KINDS)}")

    def resolve(self, kind: str, name: str) -> ComponentEntry:
        """Find a component by name, or by qualified name ``DIST:NAME`` / ``PLUGIN:NAME``.

        Raises :class:`FundiffError` naming the problem: unknown name (with near matches and
        the known names, and any broken plugin that might have provided it) or a name two
        plugins registered (with both distributions and how to qualify).
        """
        self._check_kind(kind)
        if not isinstance(name, str) or not name:
            raise FundiffError(f"a {kind} name must be a non-empty string, got {name!r}")
        table = self._table[kind]
        qualifier, _, base = name.rpartition(":")
        candidates = table.get(base, [])
        if qualifier:
            candidates = [e for e in candidates if qualifier in (e.distribution, e.plugin)]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            options = " or ".join(f"'{e.distribution or e.plugin}:{base}'" for e in candidates)
            origins = "; ".join(e.origin for e in candidates)
            raise FundiffError(
                f"{kind} '{base}' is registered by more than one plugin ({origins}); "
                f"pick one with a qualified name: {options}, or disable one plugin"
            )
        known = ", ".join(sorted(table)) or "(none)"
        message = f"unknown {kind} '{name}'; {suggest(base, table)}known: {known}"
        if qualifier and base in table:
            message = (
                f"no {kind} '{base}' from '{qualifier}'; it is registered by "
                + "; ".join(e.origin for e in table[base])
            )
        disabled = [p for p in self.plugins if p.disabled]
        if disabled:
            message += ". Disabled plugins (enable them to use their components): " + ", ".join(p.qualified for p in disabled)
        if self.broken:
            message += ". Broken plugins that may have provided it: " + "; ".join(
                f"{p.qualified} ({p.error})" for p in self.broken
            )
        raise FundiffError(message)

    def name_of(self, kind: str, cls: type) -> Optional[str]:
        """The name a class is registered under (qualified when the name is ambiguous)."""
        for entries in self._table.get(kind, {}).values():
            for entry in entries:
                if entry.cls is cls:
                    return entry.name if len(entries) == 1 else f"{entry.distribution or entry.plugin}:{entry.name}"
        return None

    def build(self, kind: str, name: str, **params: Any) -> Component:
        """Instantiate a component by name with keyword parameters (validated)."""
        from .config import structure  # local import: config imports registry types

        entry = self.resolve(kind, name)
        return structure(entry.cls, params, path=kind, registry=self)
