"""What every msvse command shares: user errors become one line and exit status 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from msvse.errors import MsvseError


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


click.ClickException.exit_code = 2
