"""Errors that cmr reports to users as one clear line (CLI exit 2, HTTP 4xx)."""

from __future__ import annotations


class CMRError(Exception):
    """Base class for user-facing errors."""


class DataError(CMRError):
    """A malformed data file: names the file, the line (1-based) and the field."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f":{line}" if line else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class UnknownPolicyError(CMRError):
    """A policy name that is not registered."""


class HubError(CMRError):
    """Invalid hub operation (duplicate id, unknown id, malformed card)."""
