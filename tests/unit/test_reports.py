"""Per-tenant figures, KV wait, SLO settings, time series, CDFs and trace events."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console

from kvflow.cli.progress import ReplayProgress
from kvflow.config import KVFlowConfig
from kvflow.request import SLO, FinishReason, Request, RequestState, RequestStatus
from kvflow.scheduler import Scheduler, StepPlan, StepResult
from kvflow.traces.metrics import RunReport, summarize
from kvflow.traces.plots import LatencyCDF, file_stem
from kvflow.traces.replay import StepHook, replay
from kvflow.traces.slo import SLOSettings, parse_tenant_slo
from kvflow.traces.timeseries import TimeSeriesRecorder, chain_hooks
from kvflow.traces.trace_events import TraceEventWriter
from tests.builders import make_request

REL = 1e-3  # HdrHistogram at 3 significant figures reports bucket upper bounds
_ids = itertools.count()


def make_state(
    tenant: str,
    arrival: float,
    token_times: Sequence[float],
    *,
    slo: SLO | None = None,
    scheduled: float | None = None,
    cached: int = 0,
    kv_wait_s: float = 0.0,
    reason: FinishReason = FinishReason.LENGTH,
    prompt_len: int = 100,
) -> RequestState:
    """A request of `tenant` whose output tokens came at `token_times`."""
    request = Request(
        f"t{next(_ids)}",
        tuple(range(prompt_len)),
        max(len(token_times), 1),
        arrival_time=arrival,
        tenant=tenant,
        slo=slo or SLO(),
    )
    state = RequestState(request)
    state.token_ids.extend(7 for _ in token_times)
    state.token_times = list(token_times)
    state.first_token_time = token_times[0] if token_times else None
    state.first_scheduled_time = scheduled
    state.finish_time = token_times[-1] if token_times else arrival
    state.num_cached_tokens = cached
    state.kv_wait_s = kv_wait_s
    state.finish_reason = reason
    state.status = RequestStatus.FINISHED
    return state


def report_of(states: Sequence[RequestState]) -> RunReport:
    return summarize(
        states,
        policy="fcfs",
        num_preemptions=0,
        prefix_hit_tokens=0,
        prefix_query_tokens=0,
        sim_steps=0,
        num_leaked_blocks=0,
        wall_s=0.0,
    )


@pytest.fixture
def two_tenants() -> list[RequestState]:
    tight = SLO(ttft_ms=100.0, tpot_ms=20.0)
    return [
        # "a": TTFT 100 and TPOT 20 (met exactly); queued 10 ms; 40 of 100 tokens cached.
        make_state("a", 0.0, [0.1, 0.12, 0.14], slo=tight, scheduled=0.01, cached=40),
        # "a": TTFT 300 (missed); queued 200 ms, 50 ms of it waiting for KV; none cached.
        make_state("a", 1.0, [1.3, 1.31], slo=tight, scheduled=1.2, kv_wait_s=0.05),
        # "b": no SLO (met); TTFT 50; queued 0; 100 cached; ends the run at t=2.0.
        make_state("b", 1.5, [1.55, 2.0], scheduled=1.5, cached=100),
        # "b": rejected, counted only in the counts.
        make_state("b", 1.6, [], reason=FinishReason.REJECTED),
    ]


def test_per_tenant_figures_match_the_hand_worked_values(two_tenants: list[RequestState]) -> None:
    report = report_of(two_tenants)
    assert list(report.per_tenant) == ["a", "b"]
    a, b = report.per_tenant["a"], report.per_tenant["b"]
    assert (a.num_requests, a.num_finished, a.num_rejected, a.num_slo_met) == (2, 2, 0, 1)
    assert (b.num_requests, b.num_finished, b.num_rejected, b.num_slo_met) == (2, 1, 1, 1)
    assert a.ttft_ms.count == 2 and a.ttft_ms.mean == pytest.approx(200.0)
    assert a.ttft_ms.p99 == pytest.approx(300.0, rel=REL)
    assert a.tpot_ms.mean == pytest.approx(15.0)  # (20 + 10) / 2
    assert b.ttft_ms.mean == pytest.approx(50.0) and b.tpot_ms.mean == pytest.approx(450.0)
    assert a.queue_ms.mean == pytest.approx(105.0) and b.queue_ms.mean == 0.0
    assert a.slo_attainment == 0.5 and b.slo_attainment == 1.0
    assert a.prefix_hit_rate == pytest.approx(0.2) and b.prefix_hit_rate == 1.0
    # Goodput divides by the run's duration (0.0 -> 2.0 s), so the tenants' add up.
    assert a.goodput_rps == pytest.approx(0.5) and b.goodput_rps == pytest.approx(0.5)
    assert a.goodput_rps + b.goodput_rps == pytest.approx(report.goodput_rps)


def test_kv_wait_is_its_own_metric_and_zero_reads_zero(two_tenants: list[RequestState]) -> None:
    report = report_of(two_tenants)
    # Three served requests waited 0, 50 and 0 ms for KV.
    assert report.kv_wait_ms.count == 3
    assert report.kv_wait_ms.mean == pytest.approx(50.0 / 3)
    assert report.kv_wait_ms.p50 == 0.0
    assert report.kv_wait_ms.p99 == pytest.approx(50.0, rel=REL)
    assert report.per_tenant["b"].kv_wait_ms.p99 == 0.0
    assert report.per_tenant["a"].kv_wait_ms.p99 == pytest.approx(50.0, rel=REL)
    assert report.queue_ms.mean == pytest.approx(210.0 / 3)


def test_json_adds_kv_wait_and_per_tenant_after_the_existing_keys(
    two_tenants: list[RequestState],
) -> None:
    data = json.loads(json.dumps(report_of(two_tenants).to_json()))
    keys = list(data)
    assert keys[keys.index("num_slo_met") + 1 :] == ["kv_wait_ms", "per_tenant"]
    tenant = data["per_tenant"]["a"]
    assert list(tenant)[:7] == [
        "num_requests",
        "num_finished",
        "ttft_ms",
        "tpot_ms",
        "slo_attainment",
        "goodput_rps",
        "prefix_hit_rate",
    ]
    assert set(tenant) >= {"queue_ms", "kv_wait_ms", "e2e_ms", "num_slo_met"}
    assert list(tenant["ttft_ms"]) == ["p50", "p90", "p95", "p99", "p999", "mean"]


def test_slo_settings_fill_in_missing_fields_and_tenants_beat_the_global() -> None:
    own = make_request(8, tenant="a", ttft_ms=300.0)
    bare_a = make_request(8, tenant="a")
    bare_b = make_request(8, tenant="b")
    settings = SLOSettings(ttft_ms=1000.0, tpot_ms=50.0, per_tenant={"a": SLO(ttft_ms=200.0)})
    got = [r.slo for r in settings.apply([own, bare_a, bare_b])]
    assert got == [
        SLO(ttft_ms=300.0, tpot_ms=50.0),  # the trace's TTFT kept, TPOT filled in
        SLO(ttft_ms=200.0, tpot_ms=50.0),  # the tenant's TTFT, the global TPOT
        SLO(ttft_ms=1000.0, tpot_ms=50.0),
    ]
    override = SLOSettings(ttft_ms=1000.0, override=True)
    assert override.apply([own])[0].slo == SLO(ttft_ms=1000.0)
    assert SLOSettings().apply([own])[0] is own


def test_tenant_slo_flags_parse_and_bad_ones_quote_the_text() -> None:
    assert parse_tenant_slo("t0=500,50") == ("t0", SLO(500.0, 50.0))
    assert parse_tenant_slo("t0=,50") == ("t0", SLO(None, 50.0))
    assert parse_tenant_slo("t0=500") == ("t0", SLO(500.0, None))
    for bad in ("t0", "=5", "t0=", "t0=fast", "t0=1,2,3"):
        with pytest.raises(ValueError, match="TENANT=TTFT_MS"):
            parse_tenant_slo(bad)
    with pytest.raises(ValueError, match="positive"):
        parse_tenant_slo("t0=-5")


def _requests(n: int) -> list[Request]:
    return [make_request(64, 8, arrival=0.002 * i, base=10 * i) for i in range(n)]


def test_downsampled_series_is_every_stride_th_sample_of_the_full_one() -> None:
    full, small = TimeSeriesRecorder(max_points=100_000), TimeSeriesRecorder(max_points=8)
    hook = chain_hooks([full.on_step, small.on_step])
    result = replay(_requests(40), KVFlowConfig(), "fcfs", on_step=hook)
    everything, thinned = full.series(), small.series()
    assert len(everything) == result.stats.num_steps > 8
    assert 4 <= len(thinned) < 8 and thinned.step_stride > 1
    stride = thinned.step_stride
    assert thinned.time_s == everything.time_s[::stride][: len(thinned)]
    assert thinned.num_waiting == everything.num_waiting[::stride][: len(thinned)]
    assert all(0.0 <= u <= 1.0 for u in everything.kv_usage)
    assert everything.hit_rate[-1] == pytest.approx(result.stats.prefix_hit_rate)
    assert max(everything.num_batched) <= 40 and everything.num_waiting[-1] == 0


def test_recorder_refuses_odd_or_tiny_bounds() -> None:
    for bad in (0, 1, 7):
        with pytest.raises(ValueError, match="even number"):
            TimeSeriesRecorder(max_points=bad)


def test_chain_hooks_calls_each_in_order_and_drops_nones() -> None:
    calls: list[str] = []

    def hook(tag: str) -> StepHook:
        def on_step(s: Scheduler, p: StepPlan, r: StepResult, now: float) -> None:
            calls.append(tag)

        return on_step

    assert chain_hooks([None, None]) is None
    only = hook("x")
    assert chain_hooks([None, only]) is only
    both = chain_hooks([hook("a"), None, hook("b")])
    replay(_requests(2), KVFlowConfig(), "fcfs", on_step=both)
    assert calls[:4] == ["a", "b", "a", "b"] and len(calls) % 2 == 0


def test_cdf_is_thinned_to_evenly_spaced_ranks_keeping_the_maximum() -> None:
    cdf = LatencyCDF.of([float(v) for v in range(2500, 0, -1)], max_points=1000)
    assert len(cdf.values_ms) <= 1001
    assert cdf.values_ms[-1] == 2500.0 and cdf.fractions[-1] == 1.0
    assert cdf.values_ms == sorted(cdf.values_ms) and cdf.fractions == sorted(cdf.fractions)
    assert cdf.values_ms[0] == 3.0 and cdf.fractions[0] == pytest.approx(3 / 2500)
    small = LatencyCDF.of([5.0, 1.0])
    assert (small.values_ms, small.fractions) == ([1.0, 5.0], [0.5, 1.0])
    assert LatencyCDF.of([]).values_ms == []


def test_file_stems_are_safe() -> None:
    assert file_stem("lpm") == "lpm"
    assert file_stem("my/policy v2") == "my_policy_v2"
    assert file_stem("..") == "run"


def test_trace_events_have_one_complete_event_per_step(tmp_path: Path) -> None:
    path = tmp_path / "steps.json"
    with TraceEventWriter(path) as writer:
        first = replay(_requests(12), KVFlowConfig(), "fcfs", on_step=writer.track("fcfs"))
        second = replay(_requests(12), KVFlowConfig(), "lpm", on_step=writer.track("lpm"))
        assert writer.num_steps("fcfs") == first.stats.num_steps
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    names = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert names == {"fcfs": 1, "lpm": 2}
    for tid, result in ((1, first), (2, second)):
        steps = [e for e in events if e["ph"] == "X" and e["tid"] == tid]
        assert len(steps) == result.stats.num_steps
        assert [e["args"]["step_id"] for e in steps] == list(range(1, len(steps) + 1))
        for e in steps:
            assert e["cat"] == "step" and e["pid"] == 1 and e["dur"] > 0
            args = e["args"]
            assert args["num_prefill_tokens"] + args["num_decode_tokens"] > 0
            assert e["name"] in ("prefill", "decode", "mixed") and args["batch_size"] >= 1
        # Steps follow one another in virtual time, and the last one ends the replay.
        ends = [e["ts"] + e["dur"] for e in steps]
        assert all(e["ts"] >= end - 1e-2 for end, e in zip(ends, steps[1:], strict=False))
        assert ends[-1] == pytest.approx(result.end_time * 1e6, abs=1e-2)
        prefill = sum(e["args"]["num_prefill_tokens"] for e in steps)
        assert result.stats.num_preemptions == 0
        assert prefill == 12 * 64 - result.stats.prefix_hit_tokens
        counters = [e for e in events if e["ph"] == "C" and e["tid"] == tid]
        assert len(counters) == 2 * len(steps)
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["tracks"] == ["fcfs", "lpm"]


def test_progress_is_off_without_a_terminal_and_fills_its_bars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvflow.cli.progress

    # Redraw on every step, so the bar's state comes from the hook, not `finish_all`.
    monkeypatch.setattr(kvflow.cli.progress, "UPDATE_EVERY_S", 0.0)
    monkeypatch.setattr(kvflow.cli.progress, "CHECK_EVERY_STEPS", 1)
    quiet = ReplayProgress(Console(file=io.StringIO()))
    assert not quiet.enabled and quiet.replay_hook("fcfs", _requests(3)) is None
    loud = Console(file=io.StringIO(), force_terminal=True)
    with ReplayProgress(loud) as progress:
        hook = progress.replay_hook("fcfs", _requests(30))
        assert hook is not None
        replay(_requests(30), KVFlowConfig(), "fcfs", on_step=hook)
        assert progress.bars() == [("fcfs", 30.0, 30.0)]
        progress.finish_all()
        assert progress.bars() == [("fcfs", 30.0, 30.0)]
