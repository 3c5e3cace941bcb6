"""One latency metric: an HdrHistogram of microseconds and its summary in milliseconds.

Latencies go into HdrHistograms as integer microseconds (1 us .. 1 hour, 3 significant
figures), so percentiles are bucket upper bounds, good to about 0.1%; means are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
"""Reported percentiles, by key."""


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles and mean of one latency metric, in milliseconds (0.0 when empty: check
    `count`; the JSON form says null)."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    mean: float = 0.0

    def to_dict(self) -> dict[str, float | None]:
        """``{"p50", "p90", "p95", "p99", "p999", "mean"}`` in ms (the count is left out);
        each None when nothing was recorded, so that no figure reads as a 0 ms latency."""
        if not self.count:
            return dict.fromkeys(("p50", "p90", "p95", "p99", "p999", "mean"))
        return {
            "p50": self.p50,
            "p90": self.p90,
            "p95": self.p95,
            "p99": self.p99,
            "p999": self.p999,
            "mean": self.mean,
        }


class LatencyRecorder:
    """Collects latencies given in seconds into an HdrHistogram of microseconds.

    Values below 1 us are recorded as 1 us and values above an hour as an hour; the
    mean is computed from the exact values.

    Args:
        exact_zero: record an exact 0 as 0 rather than 1 us, for delays most requests
            never have (waiting for KV), so that their percentiles read 0.0.
    """

    def __init__(self, *, exact_zero: bool = False) -> None:
        self._histogram = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
        self._lowest_us = 0 if exact_zero else LOWEST_US
        self._count = 0
        self._sum_s = 0.0

    @property
    def count(self) -> int:
        return self._count

    def record_s(self, seconds: float) -> None:
        """Record one latency.

        Raises:
            ValueError: a negative or non-finite latency (timestamps out of order).
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {seconds!r}")
        micros = round(seconds * 1e6) or (LOWEST_US if seconds else 0)
        micros = min(max(micros, self._lowest_us), HIGHEST_US)
        self._histogram.record_value(micros)
        self._count += 1
        self._sum_s += seconds

    def summary(self) -> LatencySummary:
        """Percentiles (bucket upper bounds) and exact mean, in ms."""
        if not self._count:
            return LatencySummary()
        by_percentile = self._histogram.get_percentile_to_value_dict(list(PERCENTILES.values()))
        ms = {key: by_percentile[p] / 1000.0 for key, p in PERCENTILES.items()}
        return LatencySummary(count=self._count, mean=self._sum_s / self._count * 1000.0, **ms)
