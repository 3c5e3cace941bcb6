"""What every trace format shares: options, the load log, the result, and the base class.

A format is a `TraceFormat` subclass with a `name`, a cheap `sniff(head)` that says
whether a file starting like `head` is in the format, and `read(path, options, log)`
that turns every record into a `Request`. Records it cannot read go to `log.bad(...)`,
which raises `TraceFormatError` or, with ``skip_bad_lines``, counts and skips them.
"""

from __future__ import annotations

import json
import os
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvflow.request import Request
from kvflow.traces.errors import BadLinesSkippedWarning, TraceFormatError
from kvflow.traces.limits import MAX_TRACE_TOKENS

T = TypeVar("T", int, float)

HEAD_BYTES = 1 << 16
"""How much of a file `TraceHead` reads for detection."""

MAX_FIRST_LINE_BYTES = 1 << 26
"""How far `TraceHead` reads to finish a first line longer than `HEAD_BYTES`."""

MAX_KEPT_ERRORS = 10
"""How many skipped-line messages a `LoadedTrace` keeps."""


class TraceOptions(BaseModel):
    """How to read a trace. Each format uses the options that apply to it."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    skip_bad_lines: bool = False
    """Skip malformed records with one warning and a count, instead of failing on the first."""
    namespace: str | None = Field(default=None, min_length=1)
    """Name that seeds the synthesised tokens of formats without token ids (Mooncake
    hash ids, Azure and BurstGPT prompts); default: the file name's stem. Files read
    with the same namespace share the blocks of equal hash ids."""
    hash_block_size: int = Field(default=512, ge=1, le=MAX_TRACE_TOKENS)
    """Tokens per Mooncake hash id (512 in the Mooncake releases)."""
    tokenizer: str | None = Field(default=None, min_length=1)
    """ShareGPT: a transformers tokenizer installed locally (name or path); default:
    kvflow's built-in deterministic tokenizer."""
    session_rate_rps: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """ShareGPT: conversations start as a Poisson process at this rate (per second)."""
    think_time_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    """ShareGPT: seconds between the turns of one conversation."""
    seed: int = 0
    """ShareGPT: seed of the conversation start times."""
    keep_failed: bool = False
    """BurstGPT and Azure: keep responses with 0 output tokens (failures), as requests
    with 1 output token; default: leave them out and count them."""

    @classmethod
    def of(cls, options: TraceOptions | None = None, **overrides: Any) -> TraceOptions:
        """`options` (or the defaults) with `overrides` applied.

        Raises:
            ValueError: an unknown option or a bad value, quoting it.
        """
        base = options if options is not None else cls()
        if not overrides:
            return base
        try:
            return cls.model_validate({**base.model_dump(), **overrides})
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}"
                for e in err.errors()
            )
            raise ValueError(f"invalid trace option: {problems}") from None

    def namespace_of(self, path: Path) -> str:
        """The namespace to use for `path`: the option, else the file name's stem."""
        if self.namespace is not None:
            return self.namespace
        name = path.name
        for suffix in (".gz", ".jsonl", ".json", ".csv"):
            name = name.removesuffix(suffix)
        return name or path.name


class LoadLog:
    """Where a reader reports records it could not read, and records it left out.

    Args:
        path: the trace file, for messages.
        skip_bad_lines: count and skip bad records instead of raising.
    """

    def __init__(self, path: str | os.PathLike[str], skip_bad_lines: bool = False) -> None:
        self.path = str(path)
        self.skip_bad_lines = skip_bad_lines
        self.num_bad_lines = 0
        self.bad_line_errors: list[str] = []
        self.dropped: Counter[str] = Counter()

    def error(self, line_no: int | None, problem: object) -> TraceFormatError:
        """The error naming this file, the line (when known) and `problem`."""
        where = self.path if line_no is None else f"{self.path}:{line_no}"
        return TraceFormatError(f"{where}: {problem}")

    def bad(self, line_no: int | None, problem: object) -> None:
        """A malformed record.

        Raises:
            TraceFormatError: naming file, line and `problem`, unless skipping bad lines.
        """
        error = self.error(line_no, problem)
        if not self.skip_bad_lines:
            raise error
        self.num_bad_lines += 1
        if len(self.bad_line_errors) < MAX_KEPT_ERRORS:
            self.bad_line_errors.append(str(error))

    def drop(self, reason: str) -> None:
        """A well-formed record left out on purpose (e.g. a failed response)."""
        self.dropped[reason] += 1


@dataclass(frozen=True, slots=True)
class LoadedTrace:
    """A trace read by `read_trace`: its requests and what was skipped on the way.

    Attributes:
        requests: ordered by arrival (ties keep file order).
        format: the format's name.
        num_bad_lines: malformed records skipped (only with ``skip_bad_lines``).
        bad_line_errors: the first few of their messages.
        dropped: well-formed records left out, by reason (e.g. BurstGPT failures).
    """

    path: Path
    requests: list[Request]
    format: str
    num_bad_lines: int = 0
    bad_line_errors: tuple[str, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TraceHead:
    """The start of a file, as format detection sees it.

    Attributes:
        path: the file.
        suffix: its last suffix before any ``.gz``, lower case (``".csv"``).
        text: up to `HEAD_BYTES` of its (decompressed) text; undecodable bytes replaced.
        first_line: the first non-blank line, stripped.
        first_json: that line parsed as JSON, or None when it is not JSON.
        csv_columns: that line split on commas, each name normalised by `column_key`.
    """

    path: Path
    suffix: str
    text: str
    first_line: str
    first_json: Any
    csv_columns: tuple[str, ...]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TraceHead:
        """Read the head of `path`.

        Raises:
            TraceFormatError: the file cannot be read.
        """
        from kvflow.traces.formats._io import open_binary

        path = Path(path)
        try:
            with open_binary(path) as file:
                raw = file.read(HEAD_BYTES)
                if len(raw) == HEAD_BYTES and not raw.strip(b" \t\r\n").count(b"\n"):
                    raw += file.readline(MAX_FIRST_LINE_BYTES)  # finish a long first line
        except (OSError, EOFError) as err:
            raise TraceFormatError(f"{path}: cannot read trace file: {err}") from None
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
        lines = text.splitlines()
        if len(raw) >= HEAD_BYTES and not raw.endswith(b"\n") and len(lines) > 1:
            lines.pop()  # cut short
        first_line = next((line.strip() for line in lines if line.strip()), "")
        try:
            first_json = json.loads(first_line) if first_line else None
        except (ValueError, RecursionError):
            first_json = None
        name = path.name.lower().removesuffix(".gz")
        suffix = Path(name).suffix
        columns = tuple(column_key(c) for c in first_line.split(","))
        return cls(path, suffix, text, first_line, first_json, columns)


def column_key(name: str) -> str:
    """A CSV column name for matching: lower case, no spaces, underscores or quotes."""
    return "".join(c for c in name.lower() if c not in " _\"'\t-")


class TraceFormat(ABC):
    """A trace file format: detection and reading into `Request`s.

    Subclasses set `name` and `summary` and implement `sniff` and `read`. Instances are
    callable: ``fmt(path, **options)`` returns the requests, like `load_trace`.
    """

    name: ClassVar[str]
    """The format's name, as `load_trace(format=...)` and ``--format`` take it."""
    summary: ClassVar[str]
    """One line for listings."""

    @abstractmethod
    def sniff(self, head: TraceHead) -> bool:
        """Whether a file that starts like `head` is in this format (no full read)."""

    @abstractmethod
    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        """The file's requests, in any order.

        Args:
            path: the trace file.
            options: the options; use those that apply to this format.
            log: report each malformed record with `log.bad(line, problem)` (which raises
                unless skipping) and each record left out on purpose with `log.drop`.

        Raises:
            TraceFormatError: the file cannot be read, or a record is malformed; the
                message names the file, the line and the field.
        """

    def load(self, path: str | os.PathLike[str], options: TraceOptions) -> LoadedTrace:
        """Read `path`, order its requests by arrival, and warn once about skipped lines."""
        path = Path(path)
        log = LoadLog(path, options.skip_bad_lines)
        requests = sorted(self.read(path, options, log), key=_arrival)
        if log.num_bad_lines:
            warnings.warn(
                BadLinesSkippedWarning(str(path), log.num_bad_lines, tuple(log.bad_line_errors)),
                stacklevel=3,
            )
        return LoadedTrace(
            path=path,
            requests=requests,
            format=self.name,
            num_bad_lines=log.num_bad_lines,
            bad_line_errors=tuple(log.bad_line_errors),
            dropped=dict(log.dropped),
        )

    def __call__(self, path: str | os.PathLike[str], **options: Any) -> list[Request]:
        """The requests of `path`, ordered by arrival (options as `TraceOptions` fields)."""
        return self.load(path, TraceOptions.of(**options)).requests

    def __repr__(self) -> str:
        return f"<trace format {self.name!r}>"


def _arrival(request: Request) -> float:
    return request.arrival_time


def rebase(arrivals: list[T]) -> list[T]:
    """Arrival times shifted so the earliest is 0 (an empty list stays empty)."""
    if not arrivals:
        return arrivals
    t0 = min(arrivals)
    return [t - t0 for t in arrivals]
