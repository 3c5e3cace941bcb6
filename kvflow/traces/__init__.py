"""Traces: formats, synthetic workloads, shaping, replay, metrics.

`load_trace(path)` reads any supported format (`TRACE_FORMATS`: kvflow native, Mooncake,
Azure, BurstGPT, ShareGPT) into `Request`s ordered by arrival; `read_trace` also says
what was skipped. `bundled_sample_path()` is a small shared-prefix trace shipped with
the package; `bundled_samples()` lists every bundled trace.
"""

from __future__ import annotations

from pathlib import Path

from kvflow.traces.errors import BadLinesSkippedWarning, TraceFormatError
from kvflow.traces.formats import (
    TRACE_FORMATS,
    LoadedTrace,
    TraceFormat,
    TraceOptions,
    detect_format,
    load_trace,
    read_trace,
)
from kvflow.traces.native import dump_native, load_native

__all__ = [
    "TRACE_FORMATS",
    "BadLinesSkippedWarning",
    "LoadedTrace",
    "TraceFormat",
    "TraceFormatError",
    "TraceOptions",
    "bundled_sample_path",
    "bundled_samples",
    "detect_format",
    "dump_native",
    "load_native",
    "load_trace",
    "read_trace",
]

_DATA = Path(__file__).with_name("data")

_BUNDLED = {
    "shared-prefix": "sample.jsonl",
    "multi-turn": "multiturn.jsonl",
}


def bundled_sample_path() -> Path:
    """The default sample trace shipped with kvflow: shared system prompts, two tenants
    (regenerate: python -m kvflow.traces.make_sample)."""
    return _DATA / _BUNDLED["shared-prefix"]


def bundled_samples() -> dict[str, Path]:
    """Every bundled sample trace by name: "shared-prefix" (the default) and
    "multi-turn" (conversations whose turns share their history)."""
    return {name: _DATA / file_name for name, file_name in _BUNDLED.items()}
