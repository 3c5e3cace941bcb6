"""Traces: formats, synthetic workloads, metrics.

`load_trace(path)` reads any supported format into `Request`s ordered by arrival;
`bundled_sample_path()` is a small shared-prefix trace shipped with the package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kvflow.request import Request
from kvflow.traces.errors import TraceFormatError
from kvflow.traces.native import FORMAT_NAME, dump_native, iter_json_lines, load_native

__all__ = [
    "TRACE_FORMATS",
    "TraceFormatError",
    "bundled_sample_path",
    "detect_format",
    "dump_native",
    "load_native",
    "load_trace",
]

TRACE_FORMATS: dict[str, Callable[[str | os.PathLike[str]], list[Request]]] = {
    "native": load_native,
}
"""Loader of each supported format, by name."""

_NATIVE_KEYS = frozenset({"arrival_s", "output_len", "prompt_len", "prompt_token_ids"})


def bundled_sample_path() -> Path:
    """The sample trace shipped with kvflow (regenerate: python -m kvflow.traces.make_sample)."""
    return Path(__file__).with_name("data") / "sample.jsonl"


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a trace file, from its name and first record.

    Raises:
        TraceFormatError: naming the file, when no supported format fits.
    """
    known = ", ".join(TRACE_FORMATS)
    if Path(path).suffix != ".jsonl":
        raise TraceFormatError(
            f"{path}: cannot tell the trace format from the file name (supported formats: "
            f"{known}; native traces are .jsonl files)"
        )
    for line_no, first in iter_json_lines(path):
        if isinstance(first, dict) and (
            first.get("format") == FORMAT_NAME or _NATIVE_KEYS & first.keys()
        ):
            return "native"
        shown = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise TraceFormatError(
            f"{path}:{line_no}: cannot tell the trace format from the first record "
            f"({shown}); supported formats: {known}"
        )
    return "native"  # an empty .jsonl file is an empty native trace


def load_trace(path: str | os.PathLike[str], format: str = "auto") -> list[Request]:
    """The requests of a trace file, ordered by arrival.

    Args:
        path: the trace file.
        format: a name from `TRACE_FORMATS`, or "auto" to detect it.

    Raises:
        TraceFormatError: an unknown format or a bad record, naming the file (and line).
    """
    name = detect_format(path) if format == "auto" else format
    loader = TRACE_FORMATS.get(name)
    if loader is None:
        raise TraceFormatError(
            f"{path}: unknown trace format {name!r}; known: auto, {', '.join(TRACE_FORMATS)}"
        )
    return loader(path)
