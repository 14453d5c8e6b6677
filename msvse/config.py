"""Typed, frozen configs loaded from one section of ``params.yaml``.

Every stage describes its settings as a frozen dataclass. :func:`load_section` reads
the stage's section of a params file and builds that dataclass, refusing anything it
does not understand: an unknown or misspelt key, a value of the wrong type, a value out
of range. The error names the file and the dotted key, e.g.
``params.yaml: train.optim.lr: expected a number, got 'fast'``.

Constraints live next to the field that has them::

    @dataclass(frozen=True)
    class Optim:
        lr: float = field(default=3e-5, metadata=bounds(min=0, min_inclusive=False))
        schedule: Literal["linear", "constant"] = "linear"

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from msvse.errors import ConfigError

T = TypeVar("T")


def bounds(
    *,
    min: float | None = None,  # noqa: A002 - reads naturally at the call site
    max: float | None = None,  # noqa: A002
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> dict[str, Any]:
    """Field metadata that restricts a number (or the length of a tuple) to a range."""
    return {"bounds": (min, max, min_inclusive, max_inclusive)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a file that is missing, unparsable or not a mapping is a
    :class:`ConfigError` naming the file (and the line, for a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(path: str | Path, section: str, cls: type[T], *, overrides: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from ``section`` (dotted for nested sections) of the params file.

    ``overrides`` maps dotted keys inside the section to values that replace the file's
    (used by CLIs whose flags override params); they are checked like the file's.
    """
    data: Any = read_yaml(path)
    for part in section.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{path}: missing section '{section}'")
        data = data[part]
    if data is None:
        data = {}
    if overrides:
        data = _with_overrides(data, overrides, source=str(path), prefix=section)
    return from_dict(cls, data, source=str(path), prefix=section)


def _with_overrides(data: Any, overrides: Mapping[str, Any], *, source: str, prefix: str) -> dict:
    out = json.loads(json.dumps(data)) if data else {}
    if not isinstance(out, dict):
        raise ConfigError(f"{source}: {prefix}: expected a mapping")
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def from_dict(cls: type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, checking every key and value."""
    return _convert(cls, data, source, prefix)


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _convert(tp: Any, value: Any, source: str, key: str, meta: Mapping[str, Any] | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, source, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], value, source, key, meta)
        errors = []
        for option in rest:
            try:
                return _convert(option, value, source, key, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{_where(source, key)}: expected one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        else:
            if len(value) != len(args):
                raise ConfigError(f"{_where(source, key)}: expected a list of {len(args)} items, got {len(value)}")
            items = tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        _check_bounds(len(items), meta, source, key, what="length")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)}: expected an integer, got {value!r}")
        _check_bounds(value, meta, source, key)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-5 (no dot) as a string; accept what is plainly a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{_where(source, key)}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)}: expected a number, got {value!r}")
        _check_bounds(float(value), meta, source, key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has unsupported type {tp!r}")


def _check_bounds(value: float, meta: Mapping[str, Any] | None, source: str, key: str, what: str = "value") -> None:
    if not meta or "bounds" not in meta:
        return
    lo, hi, lo_inc, hi_inc = meta["bounds"]
    if lo is not None and (value < lo or (value == lo and not lo_inc)):
        op = ">=" if lo_inc else ">"
        raise ConfigError(f"{_where(source, key)}: {what} must be {op} {lo}, got {value}")
    if hi is not None and (value > hi or (value == hi and not hi_inc)):
        op = "<=" if hi_inc else "<"
        raise ConfigError(f"{_where(source, key)}: {what} must be {op} {hi}, got {value}")


def _convert_dataclass(cls: type, value: Any, source: str, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        names = ", ".join(sorted(fields))
        bad = unknown[0]
        raise ConfigError(f"{_where(source, _join(key, str(bad)))}: unknown key (known keys: {names})")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], source, sub, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(source, sub)}: required key is missing")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_where(source, key)}: {exc}") from None
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (tuples become lists), JSON-ready."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
