"""Reading trace files: gzip, JSON lines with line numbers, values for error messages
(CSV rows: `kvflow.traces.formats._csv`)."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

from kvflow.traces.errors import TraceFormatError
from kvflow.traces.formats.base import LoadLog


def open_binary(path: Path) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed when its name ends in ``.gz``."""
    if path.name.lower().endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def show(value: object) -> str:
    """A value for an error message: JSON where possible, at most 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_finite_number(value: object) -> TypeGuard[float]:
    """A JSON number a float holds: not a bool, NaN, an infinity, or an integer past
    float's range (JSON integers are unbounded; `math.isfinite` raises on those)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def iter_json_lines(path: Path, log: LoadLog) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for each non-blank line of a JSON-lines file.
    Lines that are not UTF-8 or not JSON go to `log.bad`.

    Raises:
        TraceFormatError: the file cannot be read (or a bad line, unless skipping).
    """
    try:
        with open_binary(path) as file:
            for line_no, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    log.bad(line_no, "not UTF-8 text")
                    continue
                if line_no == 1:
                    text = text.lstrip("\ufeff")
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    log.bad(line_no, f"invalid JSON: {err.msg} (column {err.colno})")
                    continue
                except RecursionError:  # Python's parser recurses once per level
                    log.bad(line_no, "invalid JSON: nested too deeply")
                    continue
                yield line_no, value
    except (OSError, EOFError) as err:
        raise TraceFormatError(f"{path}: cannot read trace file: {err}") from None
