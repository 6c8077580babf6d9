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


class ConfigError(CMRError, ValueError):
    """An invalid configuration value (policy, engine or app config): names the field."""


def validation_line(e, source: str = "", prefix: str = "") -> str:
    """A pydantic ``ValidationError`` as one line naming the first bad field (and how many more);
    ``prefix`` goes before the field's path (``cards.3.``)."""
    first = e.errors()[0]
    loc = prefix + ".".join(str(x) for x in first["loc"])
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        msg = f"field '{loc}': unknown option"
    else:
        x = first.get("input")
        got = f" (got {_short(x)})" if x is not None and not isinstance(x, (dict, list)) and first["type"] != "value_error" else ""
        # a validator's own ValueError already says what was wrong
        text = first["msg"].removeprefix("Value error, ") + got
        if loc and text.startswith("field '"):  # a nested validator named its own field: one path
            text = text.removeprefix("field '")
            msg = f"field '{loc}.{text}"
        else:
            msg = f"field '{loc}': {text}" if loc else text
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{source}: {msg}{more}" if source else f"{msg}{more}"


def _short(x, n: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."
