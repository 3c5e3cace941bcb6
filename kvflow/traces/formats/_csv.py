"""CSV traces with one request per row: an arrival time, prompt tokens, output tokens.

`CSVFormat` reads them (Azure, BurstGPT): the header check, the field parsers whose
errors name the column, bad rows to the load log, failed responses left out or kept,
and arrivals rebased to the earliest. A format says only which columns to read, how
its timestamps are written, and what to call the rows it leaves out.
"""

from __future__ import annotations

import csv
import io
import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from kvflow.request import Request
from kvflow.traces.errors import FieldError, TraceFormatError
from kvflow.traces.formats._io import open_binary, show
from kvflow.traces.formats.base import (
    LoadLog,
    TraceFormat,
    TraceHead,
    TraceOptions,
    column_key,
    rebase,
)
from kvflow.traces.limits import check_length, check_total
from kvflow.traces.tokens import keyed_token_ids

if TYPE_CHECKING:
    from _csv import Reader


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


def parse_length(text: str, field_name: str) -> int:
    """A CSV cell as a token count in [0, MAX_TRACE_TOKENS] ("12" or "12.0").

    Raises:
        FieldError: naming the field and quoting the text.
    """
    stripped = text.strip()
    value: object
    try:
        value = int(stripped)
    except ValueError:
        try:
            number = float(stripped)
        except ValueError:
            number = math.nan
        # Whole numbers only, and no int() of 1e300: the cap is checked on the float.
        value = int(number) if number.is_integer() and abs(number) <= 2**63 else None
    return check_length(field_name, value, show(text), minimum=0)


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


def csv_prompt(namespace: str, request_id: str, num_tokens: int) -> tuple[int, ...]:
    """The synthesised prompt of a CSV trace's request: its own tokens, no sharing."""
    return keyed_token_ids(f"csv\x1f{namespace}\x1f{request_id}", num_tokens)


class CSVFormat(TraceFormat):
    """A CSV trace with one request per row and no prefix information.

    Subclasses set `columns`, the two drop reasons and (for timestamps finer than
    seconds) `ticks_per_second`, and implement `parse_time`. A file is in the format
    when its header has the three columns (other columns are ignored). Rows with 0
    prompt tokens are left out and counted; rows with 0 output tokens too, unless
    ``keep_failed`` keeps them with 1 output token. Each prompt gets its own tokens
    (`csv_prompt`), seeded by (namespace, request id); request ids are ``r{i}``, i the
    0-based index of the data row; arrivals are seconds after the earliest timestamp.
    """

    columns: ClassVar[tuple[str, str, str]]
    """The arrival time, prompt token and output token columns, as the format names them."""
    no_prompt_reason: ClassVar[str]
    """What `LoadLog.drop` calls a row with 0 prompt tokens."""
    no_output_reason: ClassVar[str]
    """What `LoadLog.drop` calls a row with 0 output tokens (a failed response)."""
    ticks_per_second: ClassVar[float] = 1.0
    """The unit of `parse_time`: rebasing whole ticks keeps fine timestamps exact."""

    @abstractmethod
    def parse_time(self, text: str) -> float:
        """An arrival time cell, in ticks (``1 / ticks_per_second`` seconds).

        Raises:
            FieldError: naming the time column and quoting the text.
        """

    def sniff(self, head: TraceHead) -> bool:
        return {column_key(name) for name in self.columns} <= set(head.csv_columns)

    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        time_column, prompt_column, output_column = self.columns
        rows: list[tuple[str, float, int, int]] = []
        for index, (line_no, row) in enumerate(CSVRows(path, log, self.columns)):
            try:
                ticks = self.parse_time(row[time_column])
                num_in = parse_length(row[prompt_column], prompt_column)
                num_out = parse_length(row[output_column], output_column)
            except ValueError as err:
                log.bad(line_no, err)
                continue
            if num_in == 0:
                log.drop(self.no_prompt_reason)
            elif num_out == 0 and not options.keep_failed:
                log.drop(self.no_output_reason)
            else:
                rows.append((f"r{index}", ticks, num_in, max(num_out, 1)))
        check_total(path, [row[2] for row in rows])
        namespace = options.namespace_of(path)
        arrivals = [t / self.ticks_per_second for t in rebase([row[1] for row in rows])]
        return [
            Request(
                request_id=rid,
                prompt_token_ids=csv_prompt(namespace, rid, num_in),
                max_new_tokens=num_out,
                arrival_time=arrival,
            )
            for (rid, _, num_in, num_out), arrival in zip(rows, arrivals, strict=True)
        ]
