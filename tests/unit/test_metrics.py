"""Run metrics, checked against values worked out by hand from known timestamps."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Sequence

import pytest
from rich.console import Console

from kvflow.request import SLO, FinishReason, Request, RequestState, RequestStatus
from kvflow.traces.metrics import (
    LatencyRecorder,
    LatencySummary,
    RunReport,
    render_table,
    summarize,
)

REL = 1e-3  # HdrHistogram at 3 significant figures reports bucket upper bounds

_ids = itertools.count()

SCHEMA = [
    "policy",
    "num_requests",
    "num_finished",
    "num_rejected",
    "num_aborted",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "queue_ms",
    "throughput_tokens_per_s",
    "throughput_total_tokens_per_s",
    "throughput_requests_per_s",
    "duration_s",
    "prefix_hit_rate",
    "num_preemptions",
    "num_leaked_blocks",
    "sim_steps",
    "wall_s",
    "slo_attainment",
    "goodput_rps",
]
SUMMARY_KEYS = ["p50", "p90", "p95", "p99", "p999", "mean"]


def make_state(
    arrival: float,
    token_times: Sequence[float] = (),
    *,
    reason: FinishReason = FinishReason.LENGTH,
    scheduled: float | None = None,
    prompt_len: int = 8,
    slo: SLO | None = None,
    deadline: float | None = None,
) -> RequestState:
    """A finished request whose output tokens came at `token_times` (the last one ends it)."""
    request = Request(
        f"r{next(_ids)}",
        tuple(range(prompt_len)),
        max(len(token_times), 1),
        arrival_time=arrival,
        slo=slo or SLO(),
        deadline=deadline,
    )
    state = RequestState(request)
    state.token_ids.extend(7 for _ in token_times)
    state.token_times = list(token_times)
    state.first_scheduled_time = scheduled
    state.first_token_time = token_times[0] if token_times else None
    state.finish_time = token_times[-1] if token_times else arrival
    state.finish_reason = reason
    state.status = RequestStatus.FINISHED
    return state


def report_of(states: Sequence[RequestState], **overrides: object) -> RunReport:
    args: dict[str, object] = {
        "policy": "fcfs",
        "num_preemptions": 0,
        "prefix_hit_tokens": 0,
        "prefix_query_tokens": 0,
        "sim_steps": 0,
        "num_leaked_blocks": 0,
        "wall_s": 0.5,
    }
    args.update(overrides)
    return summarize(states, **args)  # type: ignore[arg-type]


def assert_summary(summary: LatencySummary, count: int, mean: float, **percentiles: float) -> None:
    assert summary.count == count
    assert summary.mean == pytest.approx(mean, rel=1e-9)
    for key, expected in percentiles.items():
        assert getattr(summary, key) == pytest.approx(expected, rel=REL), key


@pytest.fixture
def mixed_run() -> list[RequestState]:
    return [
        # A: TTFT 100, E2E 160, TPOT 60/3 = 20, gaps 20, 30, 10; queued 10 ms.
        make_state(
            0.0, [0.100, 0.120, 0.150, 0.160], scheduled=0.010, slo=SLO(ttft_ms=100.0, tpot_ms=20.0)
        ),
        # B: TTFT 300, E2E 350, TPOT 50, gap 50; queued 100 ms; misses its TTFT SLO.
        make_state(0.5, [0.800, 0.850], scheduled=0.600, slo=SLO(ttft_ms=250.0)),
        # C: one token: TTFT = E2E = 200, no TPOT, no gap; queued 50 ms; no SLO.
        make_state(1.0, [1.200], scheduled=1.050),
        # Neither counts in latencies, throughput or duration.
        make_state(0.2, [], reason=FinishReason.REJECTED),
        make_state(5.0, [5.1, 5.2, 9.0], reason=FinishReason.ABORTED, scheduled=5.0),
    ]


def test_latencies_match_the_hand_worked_values(mixed_run: list[RequestState]) -> None:
    report = report_of(mixed_run)
    # Percentile p of n values: the k-th smallest, k = round(p/100 * n) (at least 1).
    assert_summary(report.ttft_ms, 3, 200.0, p50=200.0, p90=300.0, p99=300.0, p999=300.0)
    assert_summary(report.tpot_ms, 2, 35.0, p50=20.0, p90=50.0, p99=50.0)
    assert_summary(report.itl_ms, 4, 27.5, p50=20.0, p90=50.0, p95=50.0, p99=50.0)
    assert_summary(report.e2e_ms, 3, 710.0 / 3, p50=200.0, p90=350.0, p999=350.0)
    assert_summary(report.queue_ms, 3, 160.0 / 3, p50=50.0, p99=100.0)


def test_counts_throughput_and_slos_match_the_hand_worked_values(
    mixed_run: list[RequestState],
) -> None:
    report = report_of(mixed_run, prefix_hit_tokens=300, prefix_query_tokens=1200)
    assert (report.num_requests, report.num_finished) == (5, 3)
    assert (report.num_rejected, report.num_aborted) == (1, 1)
    assert report.duration_s == pytest.approx(1.2)  # first arrival 0.0 -> last finish 1.2
    assert report.throughput_tokens_per_s == pytest.approx(7 / 1.2)
    assert report.throughput_total_tokens_per_s == pytest.approx((7 + 24) / 1.2)
    assert report.throughput_requests_per_s == pytest.approx(3 / 1.2)
    # A meets its SLOs exactly at the limit, B misses TTFT, C has none (met).
    assert report.num_slo_met == 2
    assert report.slo_attainment == 2 / 3
    assert report.goodput_rps == pytest.approx(2 / 1.2)
    assert report.prefix_hit_rate == 0.25
    assert (report.num_output_tokens, report.num_prompt_tokens) == (7, 24)


def test_a_missed_tpot_or_deadline_fails_the_request() -> None:
    slow = make_state(0.0, [0.1, 0.3, 0.5], slo=SLO(ttft_ms=500.0, tpot_ms=199.0))
    late = make_state(0.0, [0.1, 0.2], deadline=0.05)
    fine = make_state(0.0, [0.1, 0.2], slo=SLO(tpot_ms=100.0), deadline=0.1)
    report = report_of([slow, late, fine])
    assert report.num_slo_met == 1 and report.slo_attainment == 1 / 3
    assert report.goodput_rps == pytest.approx(1 / 0.5)


def test_large_sample_percentiles_are_within_histogram_precision() -> None:
    # Request i arrives at 0 and gets its only token after i ms: TTFT = 1 .. 1000 ms.
    states = [make_state(0.0, [i / 1000]) for i in range(1, 1001)]
    report = report_of(states)
    assert_summary(
        report.ttft_ms, 1000, 500.5, p50=500.0, p90=900.0, p95=950.0, p99=990.0, p999=999.0
    )
    assert report.tpot_ms == LatencySummary() and report.itl_ms.count == 0


def test_an_empty_run_reports_null_latencies_and_zero_counts() -> None:
    report = report_of([])
    data = report.to_json()
    # No request, no latency: null, never a 0.0 ms that reads as instant service.
    assert data["num_requests"] == 0 and data["ttft_ms"] == dict.fromkeys(SUMMARY_KEYS)
    assert data["kv_wait_ms"] == dict.fromkeys(SUMMARY_KEYS)
    assert report.duration_s == report.throughput_tokens_per_s == report.goodput_rps == 0.0
    assert report.slo_attainment == report.prefix_hit_rate == 0.0


def test_the_json_schema_has_the_documented_keys_in_order(mixed_run: list[RequestState]) -> None:
    report = report_of(mixed_run, sim_steps=42, num_preemptions=3, extra={"device_hits": 9})
    data = json.loads(json.dumps(report.to_json()))
    assert list(data)[: len(SCHEMA)] == SCHEMA
    assert data["device_hits"] == 9 and list(data)[-1] == "device_hits"
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms"):
        assert list(data[key]) == SUMMARY_KEYS
    assert (data["policy"], data["sim_steps"], data["num_preemptions"]) == ("fcfs", 42, 3)
    assert data["wall_s"] == 0.5 and data["num_leaked_blocks"] == 0


def test_recorder_clamps_zero_and_refuses_negative_latencies() -> None:
    recorder = LatencyRecorder()
    recorder.record_s(0.0)  # two tokens in one step: a zero gap is recorded as 1 us
    assert recorder.summary().p50 == 0.001 and recorder.summary().mean == 0.0
    with pytest.raises(ValueError, match=r"-0\.5"):
        recorder.record_s(-0.5)


def test_render_table_has_one_row_per_policy(mixed_run: list[RequestState]) -> None:
    reports = [report_of(mixed_run, policy="fcfs"), report_of(mixed_run, policy="lpm")]
    table = render_table(reports)
    # 13 columns, and "rejected" since a request was rejected (no tier split: one tier).
    assert table.row_count == 2 and len(table.columns) == 14
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "fcfs" in text and "lpm" in text and "3/5" in text and "/ 300.0" in text
