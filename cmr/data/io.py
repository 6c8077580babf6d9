"""Line-checked readers: every malformed line becomes a ``DataError`` naming file, line and field."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator

from cmr.errors import DataError


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad JSON raises ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, n, None, f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(path, n, None, "each line must be a JSON object")
            yield n, obj


def need_str(obj: dict, key: str, path: Path, n: int, optional: bool = False) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or (not optional and not v.strip()):
        raise DataError(path, n, key, "missing" if v is None else f"must be a non-empty string, got {v!r}")
    return v


def need_int(obj: dict, key: str, path: Path, n: int, minimum: int | None = None) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(path, n, key, "missing" if v is None else f"must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise DataError(path, n, key, f"must be >= {minimum}, got {v}")
    return v


def parse_float(text: str, path: Path, n: int, key: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DataError(path, n, key, f"must be a number, got {text!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise DataError(path, n, key, f"must be a finite number{rng}, got {text!r}")
    return v


def read_csv(path: Path, required: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)``; a missing column in the header raises ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in required:
            if col not in header:
                raise DataError(path, 1, col, "missing column in header")
        for row in reader:
            n = reader.line_num
            if None in row:  # more cells than header columns
                raise DataError(path, n, None, "more cells than header columns")
            yield n, row
