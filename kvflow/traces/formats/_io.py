"""Reading trace files: gzip, JSON lines and CSV rows with line numbers, field parsers."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from kvflow.traces.errors import FieldError, TraceFormatError
from kvflow.traces.formats.base import LoadLog, column_key

if TYPE_CHECKING:
    from _csv import Reader


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
                yield line_no, value
    except (OSError, EOFError) as err:
        raise TraceFormatError(f"{path}: cannot read trace file: {err}") from None


class CSVRows:
    """The data rows of a CSV file with a header, by normalised column name.

    Args:
        path: the file.
        log: where short rows go.
        required: column names (as the format documents them) that must be present;
            matched by `column_key`, so case, spaces and underscores do not matter.

    Iterating yields (line number, {required name: cell text}) for each non-blank row.

    Raises:
        TraceFormatError: the file cannot be read or lacks a required column.
    """

    def __init__(self, path: Path, log: LoadLog, required: tuple[str, ...]) -> None:
        self.path = path
        self.log = log
        self.required = required

    def __iter__(self) -> Iterator[tuple[int, Mapping[str, str]]]:
        try:
            with open_binary(self.path) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")
                yield from self._rows(csv.reader(text))
        except UnicodeDecodeError:
            raise TraceFormatError(f"{self.path}: not UTF-8 text") from None
        except csv.Error as err:
            raise TraceFormatError(f"{self.path}: unreadable CSV: {err}") from None
        except (OSError, EOFError) as err:
            raise TraceFormatError(f"{self.path}: cannot read trace file: {err}") from None

    def _rows(self, reader: Reader) -> Iterator[tuple[int, Mapping[str, str]]]:
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(f"{self.path}: empty file, expected a CSV header")
        keys = [column_key(name) for name in header]
        index: dict[str, int] = {}
        for name in self.required:
            key = column_key(name)
            if key not in keys:
                raise TraceFormatError(
                    f"{self.path}:1: field {name!r}: missing column "
                    f"(the header has {', '.join(header) or 'nothing'})"
                )
            index[name] = keys.index(key)
        width = max(index.values()) + 1
        for row in reader:
            line_no = reader.line_num  # the row's last line (quoted cells may span lines)
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < width:
                self.log.bad(line_no, f"expected {len(header)} columns, got {len(row)}")
                continue
            yield line_no, {name: row[i] for name, i in index.items()}


def parse_int(text: str, field_name: str, minimum: int = 0) -> int:
    """A CSV cell as an integer >= `minimum` ("12" or "12.0").

    Raises:
        FieldError: naming the field and quoting the text.
    """
    stripped = text.strip()
    try:
        value = int(stripped)
    except ValueError:
        try:
            number = float(stripped)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise FieldError(
                field_name, f"expected an integer >= {minimum}, got {show(text)}"
            ) from None
        value = int(number)
    if value < minimum:
        raise FieldError(field_name, f"expected an integer >= {minimum}, got {show(text)}")
    return value


def parse_seconds(text: str, field_name: str) -> float:
    """A CSV cell as a finite number of seconds >= 0.

    Raises:
        FieldError: naming the field and quoting the text.
    """
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise FieldError(field_name, f"expected a finite number >= 0, got {show(text)}")
    return value
