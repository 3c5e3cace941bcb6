"""Azure LLM inference traces (Azure/AzurePublicDataset, 2023 and 2024 releases).

CSV with the header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (column names matched
without regard to case, spaces or underscores; other columns ignored). Timestamps are
wall-clock datetimes: ``2023-11-16 18:17:03.9799600`` in 2023 (7 fractional digits, no
zone) and ``2024-05-10 00:00:00.009930+00:00`` in 2024 (a UTC offset); a ``T`` between
date and time, a trailing ``Z``, and 0 to 9 fractional digits are accepted too, and
times without an offset are taken as UTC.

The traces carry no prefix information: each prompt gets its own synthesised tokens,
seeded by (namespace, request id), so no two requests share a prefix. Arrivals are
seconds after the earliest timestamp. Rows with 0 generated tokens are left out and
counted (kept, with 1 output token, under ``keep_failed``); rows with 0 context tokens
are left out and counted. Request ids are ``r{i}``,
i the 0-based index of the data row.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from kvflow.traces.errors import FieldError
from kvflow.traces.formats._csv import CSVFormat

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch (UTC) of an Azure trace timestamp.

    Raises:
        ValueError: not a timestamp in one of the accepted forms.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a timestamp like 2023-11-16 18:17:03.9799600, got {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zone = match.group(7), match.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as err:
        raise ValueError(f"not a valid date and time ({err}): {text!r}") from None
    seconds = int((moment - _EPOCH).total_seconds())
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:  # as datetime.fromisoformat refuses them
            raise ValueError(f"not a valid UTC offset {zone!r} (at most ±23:59): {text!r}")
        seconds -= sign * (hours * 3600 + minutes * 60)
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return seconds * 1_000_000_000 + nanos


class AzureFormat(CSVFormat):
    """Azure LLM inference CSV; each prompt gets its own tokens."""

    name = "azure"
    summary = "Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens)"
    columns = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    no_prompt_reason = "0 context tokens"
    no_output_reason = "0 generated tokens"
    ticks_per_second = 1e9

    def parse_time(self, text: str) -> float:
        try:
            return parse_timestamp_ns(text)
        except ValueError as err:
            raise FieldError("TIMESTAMP", str(err)) from None
