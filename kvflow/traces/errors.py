"""Errors and warnings raised while reading traces."""

from __future__ import annotations


class TraceFormatError(ValueError):
    """A trace file that cannot be read as its format says.

    The message names the file and, where there is one, the 1-based line and the field:
    ``trace.jsonl:7: field 'output_len': expected an integer in [1, 16777216] (...), got -3``.
    """


class FieldError(ValueError):
    """A bad value of one field of one record; readers prefix it with file and line."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"field {field_name!r}: {problem}")
        self.field_name = field_name


class BadLinesSkippedWarning(UserWarning):
    """Malformed records were skipped (``skip_bad_lines``): one warning per file.

    Attributes:
        path: the trace file.
        num_bad_lines: how many records were skipped.
        first_errors: the messages of the first few, each naming file, line and field.
    """

    def __init__(self, path: str, num_bad_lines: int, first_errors: tuple[str, ...]) -> None:
        shown = f"; first: {first_errors[0]}" if first_errors else ""
        super().__init__(f"{path}: skipped {num_bad_lines} bad line(s){shown}")
        self.path = path
        self.num_bad_lines = num_bad_lines
        self.first_errors = first_errors
