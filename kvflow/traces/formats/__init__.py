"""Trace formats: a registry of `TraceFormat`s, detection, and loading.

Built-in formats live in one module each (``kvflow.traces.formats.<name>``) and are
imported when first used; third-party formats register a `TraceFormat` subclass (or
instance) under the entry-point group ``kvflow.trace_formats``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from kvflow.registry import Registry, UnknownNameError
from kvflow.request import Request
from kvflow.traces.errors import TraceFormatError
from kvflow.traces.formats.base import (
    LoadedTrace,
    LoadLog,
    TraceFormat,
    TraceHead,
    TraceOptions,
)

BUILTIN_FORMATS = {
    "native": "kvflow.traces.formats.native:NativeFormat",
    "mooncake": "kvflow.traces.formats.mooncake:MooncakeFormat",
    "azure": "kvflow.traces.formats.azure:AzureFormat",
    "burstgpt": "kvflow.traces.formats.burstgpt:BurstGPTFormat",
    "sharegpt": "kvflow.traces.formats.sharegpt:ShareGPTFormat",
}

registry: Registry[Any] = Registry("trace format", "kvflow.trace_formats", BUILTIN_FORMATS)
_instances: dict[str, TraceFormat] = {}


def get_format(name: str) -> TraceFormat:
    """The format registered as `name` (built-in or plugin).

    Raises:
        UnknownNameError: listing the known formats.
        TypeError: the plugin is not a `TraceFormat`.
    """
    fmt = _instances.get(name)
    if fmt is None:
        obj = registry.load(name)
        fmt = obj() if isinstance(obj, type) else obj
        if not isinstance(fmt, TraceFormat):
            raise TypeError(
                f"trace format {name!r} ({registry.source(name)}) is "
                f"{type(fmt).__name__}, not a kvflow TraceFormat"
            )
        _instances[name] = fmt
    return fmt


class _Formats(Mapping[str, TraceFormat]):
    """Every registered format by name, built-ins first; each loaded on first access."""

    def __getitem__(self, name: str) -> TraceFormat:
        return get_format(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())

    def __repr__(self) -> str:
        return f"TRACE_FORMATS({', '.join(self)})"


TRACE_FORMATS: Mapping[str, TraceFormat] = _Formats()
"""Every supported format by name. Each is callable: ``TRACE_FORMATS["mooncake"](path)``."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name of the format of a trace file, from its first bytes.

    Raises:
        TraceFormatError: naming the file, when it cannot be read or no format fits.
    """
    head = TraceHead.read(path)
    for name in TRACE_FORMATS:
        if get_format(name).sniff(head):
            return name
    shown = head.first_line if len(head.first_line) <= 80 else head.first_line[:77] + "..."
    raise TraceFormatError(
        f"{path}: cannot tell the trace format from its first line ({shown!r}); "
        f"supported formats: {', '.join(TRACE_FORMATS)} (name one with format=... "
        "or --format)"
    )


def read_trace(
    path: str | os.PathLike[str],
    format: str = "auto",
    options: TraceOptions | None = None,
    **overrides: Any,
) -> LoadedTrace:
    """Read a trace file: its requests ordered by arrival, and what was skipped.

    Args:
        path: the trace file (``.gz`` files are decompressed).
        format: a name from `TRACE_FORMATS`, or "auto" to detect it.
        options: how to read it; `overrides` replace single fields
            (``read_trace(p, skip_bad_lines=True, namespace="a")``).

    Raises:
        TraceFormatError: an unknown format, or a bad record, naming the file, line
            and field (bad records are skipped with one warning under
            ``skip_bad_lines``).
        ValueError: an unknown option or a bad option value.
    """
    opts = TraceOptions.of(options, **overrides)
    name = detect_format(path) if format == "auto" else format
    try:
        fmt = get_format(name)
    except UnknownNameError:
        raise TraceFormatError(
            f"{path}: unknown trace format {name!r}; known: auto, {', '.join(TRACE_FORMATS)}"
        ) from None
    return fmt.load(path, opts)


def load_trace(
    path: str | os.PathLike[str],
    format: str = "auto",
    options: TraceOptions | None = None,
    **overrides: Any,
) -> list[Request]:
    """The requests of a trace file, ordered by arrival (see `read_trace`).

    Raises:
        TraceFormatError: an unknown format or a bad record, naming the file (and line).
    """
    return read_trace(path, format, options, **overrides).requests


__all__ = [
    "BUILTIN_FORMATS",
    "TRACE_FORMATS",
    "LoadLog",
    "LoadedTrace",
    "TraceFormat",
    "TraceHead",
    "TraceOptions",
    "detect_format",
    "get_format",
    "load_trace",
    "read_trace",
    "registry",
]
