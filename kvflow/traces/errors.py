"""Errors raised while reading traces."""

from __future__ import annotations


class TraceFormatError(ValueError):
    """A trace file that cannot be read as its format says.

    The message names the file and, where there is one, the 1-based line and the field:
    ``trace.jsonl:7: field 'output_len': expected an integer >= 1, got -3``.
    """
