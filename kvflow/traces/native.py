"""The kvflow native trace format: JSON lines, version 1.

An optional first line is a header, ``{"format": "kvflow-trace", "version": 1}``. Every
other non-blank line is one request object:

| key | | meaning |
| --- | --- | --- |
| `arrival_s` | required | arrival time in seconds, a finite number >= 0 |
| `output_len` | required | output tokens to generate, an integer in [1, 2**24] |
| `prompt_token_ids` | either | the prompt, 1 to 2**24 integers in [0, 2**32) |
| `prompt_len` | or | prompt length, an integer in [1, 2**24]; tokens are synthesised |
| `prefix_group` | optional | with `prompt_len`: name of a group of shared prefixes |
| `prefix_len` | optional | with `prefix_group`: leading tokens taken from the group (0) |
| `id` | optional | request id, unique in the file (default ``r{index}``, 0-based) |
| `tenant` | optional | who sent it (default ``"default"``) |
| `priority` | optional | integer, lower is more important (default 0) |
| `ttft_slo_ms`, `tpot_slo_ms` | optional | objectives in ms, positive numbers |
| `deadline_s` | optional | absolute time the first token is due, >= `arrival_s` |

With `prompt_len`, the first `prefix_len` tokens are the group's (see
`kvflow.traces.tokens`), identical for every request of the group in every process;
the rest come from the request id. Unknown keys are errors, and every error names the
file, the line and the field. Lengths are capped at `kvflow.traces.limits.MAX_TRACE_TOKENS`
(2**24), and a file whose prompts would not fit in RAM is refused before any is built.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvflow.request import SLO, Request, SamplingParams
from kvflow.traces.errors import FieldError
from kvflow.traces.formats import read_trace
from kvflow.traces.formats._io import is_finite_number, show
from kvflow.traces.formats._io import iter_json_lines as _iter_json_lines
from kvflow.traces.formats.base import LoadLog, TraceOptions
from kvflow.traces.limits import MAX_TRACE_TOKENS, check_length
from kvflow.traces.tokens import prompt_token_ids as _synth_prompt

FORMAT_NAME = "kvflow-trace"
FORMAT_VERSION = 1
HEADER: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}

_TOKEN_LIMIT = 2**32


def _expect(ok: bool, field_name: str, expected: str, value: object) -> None:
    if not ok:
        raise FieldError(field_name, f"expected {expected}, got {show(value)}")


def _is_int(value: object, minimum: int | None = None) -> bool:
    return type(value) is int and (minimum is None or value >= minimum)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_time(value: object) -> bool:
    return is_finite_number(value) and value >= 0


def _check_token_ids(value: object) -> None:
    expected = "a non-empty list of integers in [0, 2**32)"
    if not isinstance(value, list | tuple) or not value:
        raise FieldError("prompt_token_ids", f"expected {expected}, got {show(value)}")
    if len(value) > MAX_TRACE_TOKENS:
        raise FieldError(
            "prompt_token_ids",
            f"expected at most {MAX_TRACE_TOKENS} tokens "
            f"(kvflow.traces.limits.MAX_TRACE_TOKENS), got {len(value)}",
        )
    if set(map(type, value)) == {int}:  # C-speed checks: prompts run to 100k+ tokens
        try:
            array("I", value)
            return
        except OverflowError:
            pass
    index, bad = next(
        (i, t) for i, t in enumerate(value) if type(t) is not int or not 0 <= t < _TOKEN_LIMIT
    )
    raise FieldError("prompt_token_ids", f"expected {expected}, got {show(bad)} at index {index}")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request as a trace line describes it, before prompt tokens are built.

    Exactly one of `prompt_token_ids` and `prompt_len` is set. Invalid values raise
    `ValueError` naming the field (the reader adds file and line).
    """

    request_id: str
    arrival_s: float
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_len: int | None = None
    prefix_group: str | None = None
    prefix_len: int = 0
    tenant: str = "default"
    priority: int = 0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        _expect(_is_name(self.request_id), "id", "a non-empty string", self.request_id)
        _expect(_is_time(self.arrival_s), "arrival_s", "a finite number >= 0", self.arrival_s)
        check_length("output_len", self.output_len, show(self.output_len))
        self._check_prompt()
        _expect(_is_name(self.tenant), "tenant", "a non-empty string", self.tenant)
        _expect(_is_int(self.priority), "priority", "an integer", self.priority)
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            ok = value is None or (is_finite_number(value) and value > 0)
            _expect(ok, name, "a positive number of milliseconds", value)
        deadline = self.deadline_s
        ok = deadline is None or (_is_time(deadline) and deadline >= self.arrival_s)
        _expect(ok, "deadline_s", f"a finite number >= arrival_s ({self.arrival_s})", deadline)

    def _check_prompt(self) -> None:
        group = self.prefix_group
        if self.prompt_token_ids is not None:
            if self.prompt_len is not None:
                raise FieldError("prompt_len", "give prompt_token_ids or prompt_len, not both")
            if group is not None:
                raise FieldError("prefix_group", "only allowed with prompt_len")
            _check_token_ids(self.prompt_token_ids)
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        elif self.prompt_len is None:
            raise FieldError("prompt_len", "missing (give prompt_len or prompt_token_ids)")
        else:
            check_length("prompt_len", self.prompt_len, show(self.prompt_len))
        _expect(group is None or _is_name(group), "prefix_group", "a non-empty string", group)
        limit = self.prompt_len or 0
        ok = _is_int(self.prefix_len, 0) and self.prefix_len <= limit
        _expect(ok, "prefix_len", f"an integer in [0, prompt_len={limit}]", self.prefix_len)
        if self.prefix_len and group is None:
            raise FieldError("prefix_len", "needs prefix_group")

    @property
    def num_prompt_tokens(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        assert self.prompt_len is not None  # __post_init__ guarantees one of the two
        return self.prompt_len

    def build_prompt_token_ids(self) -> tuple[int, ...]:
        """The prompt's tokens: as given, or synthesised from group and request id."""
        if self.prompt_token_ids is not None:
            return self.prompt_token_ids
        return _synth_prompt(
            self.request_id,
            self.num_prompt_tokens,
            group=self.prefix_group,
            prefix_len=self.prefix_len,
        )

    def to_request(self) -> Request:
        """The `Request` this record describes."""
        return Request(
            request_id=self.request_id,
            prompt_token_ids=self.build_prompt_token_ids(),
            max_new_tokens=self.output_len,
            arrival_time=float(self.arrival_s),
            priority=self.priority,
            tenant=self.tenant,
            slo=SLO(ttft_ms=self.ttft_slo_ms, tpot_ms=self.tpot_slo_ms),
            deadline=self.deadline_s,
        )

    @classmethod
    def from_request(cls, request: Request) -> TraceRecord:
        """A record carrying `request`'s tokens. Extra keys and sampling parameters have
        no place in format version 1, so requests that set them raise `ValueError`."""
        if request.extra_keys or request.sampling != SamplingParams():
            raise ValueError(
                f"request {request.request_id!r}: extra_keys and sampling parameters "
                f"cannot be written to a kvflow trace (version {FORMAT_VERSION})"
            )
        return cls(
            request_id=request.request_id,
            arrival_s=request.arrival_time,
            output_len=request.max_new_tokens,
            prompt_token_ids=tuple(request.prompt_token_ids),
            tenant=request.tenant,
            priority=request.priority,
            ttft_slo_ms=request.slo.ttft_ms,
            tpot_slo_ms=request.slo.tpot_ms,
            deadline_s=request.deadline,
        )

    def to_json(self) -> dict[str, Any]:
        """The trace line's object; fields at their defaults are left out."""
        line: dict[str, Any] = {"id": self.request_id, "arrival_s": self.arrival_s}
        if self.prompt_token_ids is not None:
            line["prompt_token_ids"] = list(self.prompt_token_ids)
        else:
            line["prompt_len"] = self.prompt_len
            if self.prefix_group is not None:
                line["prefix_group"] = self.prefix_group
                line["prefix_len"] = self.prefix_len
        line["output_len"] = self.output_len
        if self.tenant != "default":
            line["tenant"] = self.tenant
        if self.priority != 0:
            line["priority"] = self.priority
        for key in ("ttft_slo_ms", "tpot_slo_ms", "deadline_s"):
            value = getattr(self, key)
            if value is not None:
                line[key] = value
        return line


_KEY_TO_FIELD = {"id": "request_id"} | {
    item.name: item.name for item in fields(TraceRecord) if item.name != "request_id"
}


def _record_of(obj: dict[str, Any], index: int) -> TraceRecord:
    unknown = [key for key in obj if key not in _KEY_TO_FIELD]
    if unknown:
        known = ", ".join(sorted(_KEY_TO_FIELD))
        raise FieldError(unknown[0], f"unknown key (known keys: {known})")
    for key in ("arrival_s", "output_len"):
        if key not in obj:
            raise FieldError(key, "missing (required)")
    kwargs = {_KEY_TO_FIELD[key]: value for key, value in obj.items()}
    kwargs.setdefault("request_id", f"r{index}")
    return TraceRecord(**kwargs)


def _check_header(obj: dict[str, Any]) -> None:
    for key in obj:
        if key not in HEADER:
            raise FieldError(key, "unknown key in the header (known keys: format, version)")
    _expect(obj.get("format") == FORMAT_NAME, "format", repr(FORMAT_NAME), obj.get("format"))
    _expect(
        obj.get("version") == FORMAT_VERSION and _is_int(obj.get("version")),
        "version",
        f"{FORMAT_VERSION} (the supported version)",
        obj.get("version"),
    )


def read_native(path: str | os.PathLike[str], log: LoadLog | None = None) -> list[TraceRecord]:
    """The records of a native trace file, in file order.

    Args:
        path: the file.
        log: where bad lines go (default: raise on the first).

    Raises:
        TraceFormatError: naming file, line and field, for the first bad line.
    """
    if log is None:
        log = LoadLog(path)
    records: list[TraceRecord] = []
    line_of_id: dict[str, int] = {}
    first = True
    for line_no, obj in _iter_json_lines(Path(path), log):
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {show(obj)}")
            if first and "format" in obj:
                first = False
                _check_header(obj)
                continue
            first = False
            record = _record_of(obj, len(records))
            if record.request_id in line_of_id:
                raise FieldError(
                    "id",
                    f"duplicate request id {show(record.request_id)} "
                    f"(first on line {line_of_id[record.request_id]})",
                )
        except ValueError as err:
            log.bad(line_no, err)
            continue
        line_of_id[record.request_id] = line_no
        records.append(record)
    return records


def load_native(
    path: str | os.PathLike[str], options: TraceOptions | None = None, **overrides: Any
) -> list[Request]:
    """The requests of a native trace file, ordered by arrival (ties keep file order).

    This is `read_trace` with format "native", so options act as for every format:
    ``load_native(p, skip_bad_lines=True)`` skips bad lines with one warning that
    counts them.

    Raises:
        TraceFormatError: naming file, line and field, for the first bad line (unless
            skipping them).
    """
    return read_trace(path, "native", options, **overrides).requests


def dump_native(
    requests_or_records: Iterable[Request | TraceRecord], path: str | os.PathLike[str]
) -> None:
    """Write requests (with their tokens) or records (compact when they have prompt_len)
    as a native trace, header first."""
    lines = [json.dumps(HEADER)]
    lines.extend(json.dumps(_as_record(item).to_json()) for item in requests_or_records)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _as_record(item: Request | TraceRecord) -> TraceRecord:
    return item if isinstance(item, TraceRecord) else TraceRecord.from_request(item)
