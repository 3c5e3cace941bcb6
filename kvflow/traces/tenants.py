"""Per-tenant figures of a run (`RunReport.per_tenant`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from kvflow.request import RequestState
from kvflow.traces.latency import LatencyRecorder, LatencySummary
from kvflow.traces.outcome import RequestOutcome


@dataclass(frozen=True, slots=True)
class TenantReport:
    """What one tenant's requests achieved within a run. `to_json()` is the schema.

    `goodput_rps` divides by the run's duration, so the tenants' goodputs add up to the
    run's. `prefix_hit_rate` is prompt tokens found cached at each served request's first
    admission over its prompt tokens (the run's rate counts the first admission of every
    admitted request, served or not; re-admissions after a preemption count in neither).
    """

    num_requests: int
    num_finished: int
    ttft_ms: LatencySummary
    tpot_ms: LatencySummary
    slo_attainment: float
    goodput_rps: float
    prefix_hit_rate: float
    num_rejected: int = 0
    num_aborted: int = 0
    num_slo_met: int = 0
    e2e_ms: LatencySummary = field(default_factory=LatencySummary)
    queue_ms: LatencySummary = field(default_factory=LatencySummary)
    kv_wait_ms: LatencySummary = field(default_factory=LatencySummary)

    def to_json(self) -> dict[str, Any]:
        """The tenant's figures as JSON-ready data; key order is part of the schema."""
        data: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            data[item.name] = value.to_dict() if isinstance(value, LatencySummary) else value
        return data


def _summary_of(values: Sequence[float], *, exact_zero: bool = False) -> LatencySummary:
    recorder = LatencyRecorder(exact_zero=exact_zero)
    for value in values:
        recorder.record_s(value)
    return recorder.summary()


class TenantTally:
    """One tenant's figures, gathered request by request. Latencies are kept as plain lists and
    summarised one tenant at a time, so many tenants do not hold many histograms."""

    __slots__ = (
        "e2e_s",
        "kv_wait_s",
        "num_aborted",
        "num_cached",
        "num_prompt",
        "num_rejected",
        "num_requests",
        "num_served",
        "num_slo_met",
        "queue_s",
        "tpot_s",
        "ttft_s",
    )

    def __init__(self) -> None:
        self.num_requests = self.num_served = self.num_rejected = self.num_aborted = 0
        self.num_slo_met = self.num_prompt = self.num_cached = 0
        self.ttft_s: list[float] = []
        self.tpot_s: list[float] = []
        self.e2e_s: list[float] = []
        self.queue_s: list[float] = []
        self.kv_wait_s: list[float] = []

    def add(self, state: RequestState, outcome: RequestOutcome) -> None:
        self.num_served += 1
        self.num_slo_met += outcome.met
        self.num_prompt += state.num_prompt_tokens
        self.num_cached += state.num_cached_tokens
        self.kv_wait_s.append(state.kv_wait_s)
        for value, values in zip(
            outcome.latencies_s, (self.ttft_s, self.tpot_s, self.e2e_s, self.queue_s), strict=True
        ):
            if value is not None:
                values.append(value)

    def report(self, duration_s: float) -> TenantReport:
        served = self.num_served
        return TenantReport(
            num_requests=self.num_requests,
            num_finished=served,
            ttft_ms=_summary_of(self.ttft_s),
            tpot_ms=_summary_of(self.tpot_s),
            slo_attainment=self.num_slo_met / served if served else 0.0,
            goodput_rps=self.num_slo_met / duration_s if duration_s > 0 else 0.0,
            prefix_hit_rate=self.num_cached / self.num_prompt if self.num_prompt else 0.0,
            num_rejected=self.num_rejected,
            num_aborted=self.num_aborted,
            num_slo_met=self.num_slo_met,
            e2e_ms=_summary_of(self.e2e_s),
            queue_ms=_summary_of(self.queue_s),
            kv_wait_ms=_summary_of(self.kv_wait_s, exact_zero=True),
        )
