"""Latency and throughput metrics of a run, as vLLM's and SGLang's benchmarks define them.

| metric | definition |
| --- | --- |
| TTFT | arrival -> first output token |
| TPOT | per request: (E2E - TTFT) / (output tokens - 1), only when output > 1 |
| ITL | every gap between consecutive output tokens, pooled over requests |
| E2E | arrival -> finish |
| queue | arrival -> first scheduled |
| KV wait | time spent waiting for KV blocks from lower tiers or peers (`kv_wait_s`) |
| throughput | tokens (or requests) / duration, duration = first arrival -> last finish |
| goodput | requests that met every SLO / duration |
| prefix hit rate | prompt tokens cached at first admission / prompt tokens admitted |

The prefix hit rate follows vLLM's split: what a preempted request finds when admitted
again is counted apart (`readmission_*` figures of `summarize_replay`).

A request meets its SLOs when its TTFT, its TPOT (if it has more than one output token)
and its first token's time are within `slo.ttft_ms`, `slo.tpot_ms` and `deadline`,
each where set; a request with none meets them.

`per_tenant` repeats the main figures for each tenant over the run's duration, so the
tenants' goodputs add up to the run's.

Only served requests (finished by length or stop) count; rejected and aborted requests
appear only in the counts. Latencies go into HdrHistograms as integer microseconds
(1 us .. 1 hour, 3 significant figures), so percentiles are bucket upper bounds, good
to about 0.1%; means are exact. A latency of no request is null in the JSON form.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from kvflow.request import FinishReason, RequestState
from kvflow.traces.latency import (
    HIGHEST_US,
    LOWEST_US,
    PERCENTILES,
    SIGNIFICANT_FIGURES,
    LatencyRecorder,
    LatencySummary,
)
from kvflow.traces.outcome import SERVED, RequestOutcome, request_outcome
from kvflow.traces.tenants import TenantReport, TenantTally

if TYPE_CHECKING:
    from rich.table import Table

    from kvflow.traces.replay import ReplayResult

__all__ = [
    "HIGHEST_US",
    "LOWEST_US",
    "PERCENTILES",
    "SIGNIFICANT_FIGURES",
    "LatencyRecorder",
    "LatencySummary",
    "RequestOutcome",
    "RunReport",
    "TenantReport",
    "is_unknown",
    "render_table",
    "request_outcome",
    "summarize",
    "summarize_replay",
]


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
    kv_wait_ms: LatencySummary = field(default_factory=LatencySummary)
    """Time each served request spent waiting for KV from a lower tier or a peer; a
    request that never waited counts as exactly 0."""
    per_tenant: Mapping[str, TenantReport] = field(default_factory=dict)
    """The main figures per tenant, by tenant name in sorted order."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further JSON-ready figures (per tier, per peer, ...), written after the rest."""

    def to_json(self, *, wall_clock: bool = True) -> dict[str, Any]:
        """The report as JSON-ready data; key order is part of the schema. Without
        `wall_clock`, `wall_s` (the one figure that measures the machine, not the run)
        is left out, so a virtual-time run's JSON is the same bytes in any process."""
        data: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "wall_s" and not wall_clock:
                continue
            value = getattr(self, item.name)
            if isinstance(value, LatencySummary):
                value = value.to_dict()
            elif item.name == "per_tenant":
                value = {tenant: figures.to_json() for tenant, figures in value.items()}
            elif item.name == "extra":
                continue
            data[item.name] = value
        data.update(self.extra)
        return data


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
        prefix_hit_tokens: prompt tokens found cached at requests' first admissions.
        prefix_query_tokens: prompt tokens of the requests admitted (each once); the
            hit rate's denominator.
        sim_steps: scheduler steps taken.
        num_leaked_blocks: blocks still held after every request ended (should be 0).
        wall_s: real seconds the run took.
        extra: further figures for `RunReport.extra`.
    """
    ttft, tpot, itl, e2e, queue = (LatencyRecorder() for _ in range(5))
    kv_wait = LatencyRecorder(exact_zero=True)
    recorders = (ttft, tpot, e2e, queue)
    tenants: dict[str, TenantTally] = {}
    num_rejected = num_aborted = num_served = num_slo_met = 0
    num_prompt = num_output = num_cached = 0
    first_arrival, last_finish = math.inf, -math.inf
    for state in states:
        tenant = tenants.get(state.tenant)
        if tenant is None:
            tenant = tenants[state.tenant] = TenantTally()
        tenant.num_requests += 1
        reason = state.finish_reason
        if reason not in SERVED:
            is_rejected = reason == FinishReason.REJECTED
            is_aborted = reason == FinishReason.ABORTED
            num_rejected += is_rejected
            num_aborted += is_aborted
            tenant.num_rejected += is_rejected
            tenant.num_aborted += is_aborted
            continue
        outcome = request_outcome(state)
        tenant.add(state, outcome)
        num_served += 1
        num_slo_met += outcome.met
        num_prompt += state.num_prompt_tokens
        num_output += state.num_output_tokens
        num_cached += state.num_cached_tokens
        kv_wait.record_s(state.kv_wait_s)
        for value, recorder in zip(outcome.latencies_s, recorders, strict=True):
            if value is not None:
                recorder.record_s(value)
        for earlier, later in itertools.pairwise(state.token_times):
            itl.record_s(later - earlier)
        if state.finish_time is not None:
            first_arrival = min(first_arrival, state.arrival_time)
            last_finish = max(last_finish, state.finish_time)

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
        kv_wait_ms=kv_wait.summary(),
        per_tenant={name: tenants[name].report(duration_s) for name in sorted(tenants)},
        extra=dict(extra or {}),
    )


def summarize_replay(
    result: ReplayResult, *, policy: str | None = None, extra: Mapping[str, Any] | None = None
) -> RunReport:
    """`summarize` applied to a replay's result (`policy` defaults to the result's), with
    the KV store's figures per tier added: `hit_tokens_by_tier` (first admissions),
    `bytes_moved` per direction, block promotions, demotions and disk writes, swaps and
    tier errors, the blocks a persistent disk tier recovered and dropped at start, and
    the hits of preempted requests admitted again (`readmission_hit_tokens`,
    `readmission_query_tokens`, by tier)."""
    stats = result.stats
    store = result.store_stats
    tiers: dict[str, Any] = {
        "hit_tokens_by_tier": dict(stats.hit_tokens_by_tier),
        "bytes_moved": dict(store.bytes_moved),
        "num_promoted_blocks": store.num_promoted_blocks,
        "num_demoted_blocks": store.num_demoted_blocks,
        "num_disk_writes": store.num_disk_writes,
        "num_swaps": stats.num_swaps,
        "num_tier_errors": store.num_tier_errors,
        "num_disk_blocks_recovered": store.num_disk_blocks_recovered,
        "num_disk_blocks_dropped": store.num_disk_blocks_dropped,
        "readmission_hit_tokens": stats.readmission_hit_tokens,
        "readmission_query_tokens": stats.readmission_query_tokens,
        "readmission_hit_tokens_by_tier": dict(stats.readmission_hit_tokens_by_tier),
    }
    return summarize(
        result.states,
        policy=result.policy if policy is None else policy,
        num_preemptions=stats.num_preemptions,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        prefix_query_tokens=stats.prefix_query_tokens,
        sim_steps=stats.num_steps,
        num_leaked_blocks=result.num_leaked_blocks,
        wall_s=result.wall_s,
        extra={**tiers, **(extra or {})},
    )


def is_unknown(report: RunReport, name: str) -> bool:
    """Whether the run could not know figure `name`: `extra` sets it to None (JSON null),
    as a replay against a server that does not report it does. Tables show "-"."""
    return name in report.extra and report.extra[name] is None


def render_table(reports: Sequence[RunReport], width: int | None = None) -> Table:
    """A terminal table with one row per run (print it with a `rich.console.Console`),
    fitted to `width` columns (see `kvflow.traces.tables.render_run_table`)."""
    from kvflow.traces.tables import render_run_table

    return render_run_table(reports, width)
