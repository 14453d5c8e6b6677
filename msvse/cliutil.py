"""What every msvse command shares: user errors become one line and exit status 2, and
``--set KEY=VALUE`` pairs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
import yaml

from msvse.errors import ConfigError, MsvseError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`MsvseError` (bad file, bad id, bad config) into ``error: ...`` on
    stderr and exit status 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MsvseError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def key_values(pairs: tuple[str, ...], example: str) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as {dotted key: value}, each value read as YAML (so
    ``3`` is a number, ``false`` a bool and ``[a,b]`` a list)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. {example}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML") from None
    return out


click.ClickException.exit_code = 2
