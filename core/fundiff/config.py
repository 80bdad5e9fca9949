"""Structuring plain data (from YAML) into frozen attrs classes, with errors that name paths.

``structure(cls, {"steps": 0}, path="sampler")`` raises
``RecipeError([("sampler.steps", "must be >= 1, got 0")])``. Unknown keys are refused with
near-match suggestions; values are type-checked (an int is accepted for a float, a string
written like a number is accepted for a float because YAML 1.1 reads ``1e-3`` as a
string); then each field's validator runs on its own so its message is tied to its path.

Validators with good messages for component authors: :func:`at_least`, :func:`greater_than`,
:func:`in_range`, :func:`one_of`.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Mapping, Optional, Union

import attrs

from .errors import RecipeError, suggest

# --------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------


def at_least(minimum: float):
    """Validator: value >= minimum."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")

    return check


def greater_than(bound: float):
    """Validator: value > bound."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and not value > bound:
            raise ValueError(f"must be > {bound}, got {value}")

    return check


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """Validator: value in [low, high], with either end optionally open."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (ok_low and ok_high):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"must be in {interval}, got {value}")

    return check


def one_of(*choices: Any):
    """Validator: value is one of the choices."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")

    return check


def doc(text: str) -> dict[str, str]:
    """Field metadata carrying the parameter's documentation: ``metadata=doc("...")``."""
    return {"doc": text}


# --------------------------------------------------------------------------------------
# Structuring
# --------------------------------------------------------------------------------------

_MISSING = object()
#: ``Optional[int]`` and ``int | None`` are different objects to typing.get_origin
_UNION_ORIGINS = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNION_ORIGINS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if _is_component_type(tp):
        return f"{tp.kind} section"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[tuple[str, str]], context: "_Context") -> Any:
    """Check and convert one value to type ``tp``; append a problem and return _MISSING on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_component_type(tp):
        return _convert_component(value, tp, path, problems, context)
    if origin in _UNION_ORIGINS:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[tuple[str, str]] = []
            out = _convert(value, arg, path, trial, context)
            if not trial:
                return out
        problems.append((path, f"must be {_type_name(tp)}, got {value!r}"))
        return _MISSING
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = suggest(str(value), [str(c) for c in choices])
        problems.append((path, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}; {hint}".rstrip("; ")))
        return _MISSING
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append((path, f"must be a list, got {value!r}"))
            return _MISSING
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                problems.append((path, f"must be a list of {len(args)} items, got {len(value)}"))
                return _MISSING
            items = [_convert(v, a, f"{path}[{i}]", problems, context) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{path}[{i}]", problems, context) for i, v in enumerate(value)]
        if any(i is _MISSING for i in items):
            return _MISSING
        return tuple(items) if origin is tuple else list(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append((path, f"must be true or false, got {value!r}"))
        return _MISSING
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append((path, f"must be an integer, got {value!r}"))
        return _MISSING
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append((path, f"must be a number, got {value!r}"))
        return _MISSING
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append((path, f"must be a string, got {value!r}"))
        return _MISSING
    if isinstance(tp, type) and attrs.has(tp):
        if not isinstance(value, Mapping):
            problems.append((path, f"must be a mapping, got {value!r}"))
            return _MISSING
        try:
            return structure(tp, value, path=path, registry=context.registry, names=context.names)
        except RecipeError as err:
            problems.extend(err.problems)
            return _MISSING
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        problems.append((path, f"must be {_type_name(tp)}, got {value!r}"))
        return _MISSING
    return value


@attrs.define
class _Context:
    registry: Any = None  # resolves nested component sections
    names: Optional[dict[str, str]] = None  # records path -> component name as written


def _convert_component(value: Any, base: type, path: str, problems: list[tuple[str, str]], context: _Context) -> Any:
    """A nested component section (e.g. the schedule a wrapper schedule wraps)."""
    kind = base.kind
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        problems.append((path, f"must be a {kind} section such as {{name: ..., <parameters>}}, got {value!r}"))
        return _MISSING
    if context.registry is None:
        problems.append((path, f"a nested {kind} needs a registry to resolve its name"))
        return _MISSING
    from .errors import FundiffError

    try:
        entry = context.registry.resolve(kind, value["name"])
    except FundiffError as exc:
        problems.append((f"{path}.name", str(exc)))
        return _MISSING
    if not issubclass(entry.cls, base):
        problems.append((f"{path}.name", f"{kind} '{entry.name}' is not a {base.__name__}"))
        return _MISSING
    params = {k: v for k, v in value.items() if k != "name"}
    try:
        instance = structure(entry.cls, params, path=path, registry=context.registry, names=context.names)
    except RecipeError as err:
        problems.extend(err.problems)
        return _MISSING
    if context.names is not None:
        context.names[path] = value["name"]
    return instance


def public_fields(cls: type) -> list[attrs.Attribute]:
    """The attrs fields a recipe may set (those with ``init=True``)."""
    attrs.resolve_types(cls)
    return [f for f in attrs.fields(cls) if f.init]


def structure(
    cls: type,
    data: Mapping[str, Any] | None,
    *,
    path: str = "",
    ignore: tuple[str, ...] = (),
    registry: Any = None,
    names: Optional[dict[str, str]] = None,
) -> Any:
    """Build ``cls`` from a mapping, or raise :class:`RecipeError` listing every problem.

    Fields annotated with a component base class (``base: Schedule``) take a nested
    component section, resolved through ``registry``; ``names`` (if given) records the name
    written at each nested path, so :func:`unstructure` can write it back.
    """
    context = _Context(registry, names)
    data = {} if data is None else data
    prefix = f"{path}." if path else ""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, Mapping):
        raise RecipeError([(path, f"must be a mapping of parameters, got {data!r}")])
    fields = {f.alias if hasattr(f, "alias") and f.alias else f.name: f for f in public_fields(cls)}
    for key in data:
        if key in ignore:
            continue
        if key not in fields:
            hint = suggest(str(key), fields)
            known = ", ".join(fields) or "(none)"
            problems.append((f"{prefix}{key}", f"unknown parameter; {hint}parameters of {_describe(cls, path)}: {known}"))
    kwargs: dict[str, Any] = {}
    for key, field in fields.items():
        if key not in data:
            if field.default is attrs.NOTHING:
                problems.append((f"{prefix}{key}", "required parameter is missing"))
            continue
        value = _convert(data[key], field.type, f"{prefix}{key}", problems, context)
        if value is _MISSING:
            continue
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (ValueError, TypeError) as exc:
                problems.append((f"{prefix}{key}", str(exc)))
                continue
        kwargs[key] = value
    if problems:
        raise RecipeError(problems)
    try:
        instance = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError([(path, str(exc))]) from None
    if names is not None and registry is not None:
        # nested components left at their defaults: record their names too, so the
        # resolved recipe names every component and loads again
        for key, field in fields.items():
            if key in data or not _is_component_type(field.type):
                continue
            value = getattr(instance, field.name)
            name = registry.name_of(field.type.kind, type(value)) if value is not None else None
            if name is not None:
                names[f"{prefix}{key}"] = name
    return instance


def _is_component_type(tp: Any) -> bool:
    return isinstance(tp, type) and bool(getattr(tp, "kind", "")) and hasattr(tp, "requires")


def _describe(cls: type, path: str) -> str:
    return f"'{path}'" if path else cls.__name__


def unstructure(instance: Any, names: Optional[Mapping[str, str]] = None, path: str = "") -> dict[str, Any]:
    """A plain dict of an attrs instance's public fields (tuples become lists); nested
    components get back the ``name`` recorded for their path in ``names``."""
    names = names or {}

    def plain(value: Any, at: str) -> Any:
        if attrs.has(type(value)):
            inner = unstructure(value, names, at)
            return {"name": names[at], **inner} if at in names else inner
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{at}[{i}]") for i, v in enumerate(value)]
        return value

    prefix = f"{path}." if path else ""
    return {f.name: plain(getattr(instance, f.name), f"{prefix}{f.name}") for f in public_fields(type(instance))}


def describe_fields(cls: type) -> list[dict[str, str]]:
    """Name, type, default and doc of each public field (for ``fundiff show``)."""
    out = []
    for field in public_fields(cls):
        default = "(required)" if field.default is attrs.NOTHING else field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        out.append(
            {
                "name": field.name,
                "type": _type_name(field.type),
                "default": repr(default) if not isinstance(default, str) or default == "(required)" else repr(default),
                "doc": field.metadata.get("doc", ""),
            }
        )
    return out
