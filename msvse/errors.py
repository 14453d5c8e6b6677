"""Errors a user can cause. Each names the file and the line or key at fault."""

from __future__ import annotations


class MsvseError(Exception):
    """Base class for errors caused by input: files, ids, configs. CLIs print these
    as one line and exit with status 2 instead of a traceback."""


class ConfigError(MsvseError, ValueError):
    """A params file has an unknown key, a wrong type or an out-of-range value."""


class DataFormatError(MsvseError, ValueError):
    """A data file breaks the Twitter format. ``path`` and ``line`` locate the fault."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
