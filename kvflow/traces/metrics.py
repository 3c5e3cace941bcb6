"""Latency and throughput metrics of a run, as vLLM's and SGLang's benchmarks define them.

| metric | definition |
| --- | --- |
| TTFT | arrival -> first output token |
| TPOT | per request: (E2E - TTFT) / (output tokens - 1), only when output > 1 |
| ITL | every gap between consecutive output tokens, pooled over requests |
| E2E | arrival -> finish |
| queue | arrival -> first scheduled |
| throughput | tokens (or requests) / duration, duration = first arrival -> last finish |
| goodput | requests that met every SLO / duration |

A request meets its SLOs when its TTFT, its TPOT (if it has more than one output token)
and its first token's time are within `slo.ttft_ms`, `slo.tpot_ms` and `deadline`,
each where set; a request with none meets them.

Only served requests (finished by length or stop) count; rejected and aborted requests
appear only in the counts. Latencies go into HdrHistograms as integer microseconds
(1 us .. 1 hour, 3 significant figures), so percentiles are bucket upper bounds, good
to about 0.1%; means are exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.table import Table

from kvflow.request import FinishReason, RequestState

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
"""Reported percentiles, by key."""

_COLUMNS = (
    "policy",
    "done/rejected",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "ITL p99 ms",
    "E2E p50 ms",
    "out tok/s",
    "hit rate",
    "SLO met",
    "goodput/s",
    "preempt",
    "steps",
    "wall s",
)
_SERVED = frozenset({FinishReason.LENGTH, FinishReason.STOP})
_SLO_RTOL = 1e-9  # float noise in (t1 - t0) * 1000 must not fail an SLO met exactly


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles and mean of one latency metric, in milliseconds (0.0 when empty)."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    mean: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """``{"p50", "p90", "p95", "p99", "p999", "mean"}`` in ms (the count is left out)."""
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
    """

    def __init__(self) -> None:
        self._histogram = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
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
        micros = min(max(round(seconds * 1e6), LOWEST_US), HIGHEST_US)
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


@dataclass(frozen=True, slots=True)
class RunReport:
    """What one run (one policy over one trace) achieved. `to_json()` is the schema."""

    policy: str
    num_requests: int
    num_finished: int
    num_rejected: int
    num_aborted: int
    ttft_ms: LatencySummary
    tpot_ms: LatencySummary
    itl_ms: LatencySummary
    e2e_ms: LatencySummary
    queue_ms: LatencySummary
    throughput_tokens_per_s: float
    throughput_total_tokens_per_s: float
    throughput_requests_per_s: float
    duration_s: float
    prefix_hit_rate: float
    num_preemptions: int
    num_leaked_blocks: int
    sim_steps: int
    wall_s: float
    slo_attainment: float
    goodput_rps: float
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_slo_met: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further JSON-ready figures (per tier, per peer, ...), written after the rest."""

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data; key order is part of the schema."""
        data: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "extra":
                continue
            value = getattr(self, item.name)
            data[item.name] = value.to_dict() if isinstance(value, LatencySummary) else value
        data.update(self.extra)
        return data


def _is_within(value: float, limit: float | None) -> bool:
    return limit is None or value <= limit * (1 + _SLO_RTOL)


def summarize(
    states: Sequence[RequestState],
    *,
    policy: str,
    num_preemptions: int,
    prefix_hit_tokens: int,
    prefix_query_tokens: int,
    sim_steps: int,
    num_leaked_blocks: int,
    wall_s: float,
    extra: Mapping[str, Any] | None = None,
) -> RunReport:
    """The report of a run from the final states of all its requests.

    Args:
        states: every request of the run, whatever became of it.
        policy: the policy's name, the report's key.
        num_preemptions: preemptions over the run.
        prefix_hit_tokens: prompt tokens found cached, over all prefix lookups.
        prefix_query_tokens: prompt tokens looked up; the hit rate's denominator.
        sim_steps: scheduler steps taken.
        num_leaked_blocks: blocks still held after every request ended (should be 0).
        wall_s: real seconds the run took.
        extra: further figures for `RunReport.extra`.
    """
    ttft, tpot, itl, e2e, queue = (LatencyRecorder() for _ in range(5))
    num_rejected = num_aborted = num_served = num_slo_met = 0
    num_prompt = num_output = num_cached = 0
    first_arrival, last_finish = math.inf, -math.inf
    for state in states:
        reason = state.finish_reason
        num_rejected += reason == FinishReason.REJECTED
        num_aborted += reason == FinishReason.ABORTED
        if reason not in _SERVED:
            continue
        num_served += 1
        num_outputs = state.num_output_tokens
        num_prompt += state.num_prompt_tokens
        num_output += num_outputs
        num_cached += state.num_cached_tokens
        arrival = state.arrival_time
        slo = state.request.slo
        met = True
        if state.first_scheduled_time is not None:
            queue.record_s(state.first_scheduled_time - arrival)
        first_token = state.first_token_time
        if first_token is None and state.token_times:
            first_token = state.token_times[0]
        if first_token is not None:
            ttft_s = first_token - arrival
            ttft.record_s(ttft_s)
            met &= _is_within(ttft_s * 1000.0, slo.ttft_ms)
            deadline = state.request.deadline
            met &= deadline is None or _is_within(first_token, deadline)
        for earlier, later in itertools.pairwise(state.token_times):
            itl.record_s(later - earlier)
        if state.finish_time is not None:
            e2e_s = state.finish_time - arrival
            e2e.record_s(e2e_s)
            first_arrival = min(first_arrival, arrival)
            last_finish = max(last_finish, state.finish_time)
            if first_token is not None and num_outputs > 1:
                tpot_s = (state.finish_time - first_token) / (num_outputs - 1)
                tpot.record_s(tpot_s)
                met &= _is_within(tpot_s * 1000.0, slo.tpot_ms)
        num_slo_met += met

    duration_s = max(last_finish - first_arrival, 0.0) if num_served else 0.0

    def per_s(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    return RunReport(
        policy=policy,
        num_requests=len(states),
        num_finished=num_served,
        num_rejected=num_rejected,
        num_aborted=num_aborted,
        ttft_ms=ttft.summary(),
        tpot_ms=tpot.summary(),
        itl_ms=itl.summary(),
        e2e_ms=e2e.summary(),
        queue_ms=queue.summary(),
        throughput_tokens_per_s=per_s(num_output),
        throughput_total_tokens_per_s=per_s(num_prompt + num_output),
        throughput_requests_per_s=per_s(num_served),
        duration_s=duration_s,
        prefix_hit_rate=prefix_hit_tokens / prefix_query_tokens if prefix_query_tokens else 0.0,
        num_preemptions=num_preemptions,
        num_leaked_blocks=num_leaked_blocks,
        sim_steps=sim_steps,
        wall_s=wall_s,
        slo_attainment=num_slo_met / num_served if num_served else 0.0,
        goodput_rps=per_s(num_slo_met),
        num_prompt_tokens=num_prompt,
        num_output_tokens=num_output,
        num_cached_tokens=num_cached,
        num_slo_met=num_slo_met,
        extra=dict(extra or {}),
    )


def render_table(reports: Sequence[RunReport]) -> Table:
    """A terminal table with one row per run (print it with a `rich.console.Console`)."""
    table = Table(title="kvflow runs")
    for header in _COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    for report in reports:
        table.add_row(
            report.policy,
            f"{report.num_finished}/{report.num_rejected}",
            f"{report.ttft_ms.p50:.1f} / {report.ttft_ms.p99:.1f}",
            f"{report.tpot_ms.p50:.1f} / {report.tpot_ms.p99:.1f}",
            f"{report.itl_ms.p99:.1f}",
            f"{report.e2e_ms.p50:.1f}",
            f"{report.throughput_tokens_per_s:.0f}",
            f"{report.prefix_hit_rate:.1%}",
            f"{report.slo_attainment:.1%}",
            f"{report.goodput_rps:.2f}",
            str(report.num_preemptions),
            str(report.sim_steps),
            f"{report.wall_s:.2f}",
        )
    return table
