"""Load sweeps over the bundled sample: the goodput curve, capacity, and determinism."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from kvflow.cli import main
from kvflow.config import KVFlowConfig
from kvflow.request import Request
from kvflow.traces import bundled_sample_path, load_trace
from kvflow.traces.fleet_report import summarize_fleet
from kvflow.traces.metrics import summarize
from kvflow.traces.native import dump_native
from kvflow.traces.shaping import scale_to_rate
from kvflow.traces.slo import SLOSettings
from kvflow.traces.sweep import SweepPoint, capacity, sweep
from tests.fleet_helpers import conversations, run_fleet
from tests.integration.test_reports_cli import png_size

RATES = [20.0, 40.0, 60.0]
"""Below, near and above what the default instance holds on the sample (~45 req/s)."""


@pytest.fixture(scope="module")
def sample() -> list[Request]:
    return load_trace(bundled_sample_path())


@pytest.fixture(scope="module")
def serial_points(sample: list[Request]) -> list[SweepPoint]:
    return sweep(sample, KVFlowConfig(), ["fcfs", "lpm"], RATES, jobs=1)


def _without_wall_time(point: SweepPoint) -> dict[str, Any]:
    data = point.to_json()
    del data["wall_s"]
    return data


def test_grid_is_policy_major_in_the_given_order(serial_points: list[SweepPoint]) -> None:
    assert [(p.policy, p.rate_rps) for p in serial_points] == [
        (policy, rate) for policy in ("fcfs", "lpm") for rate in RATES
    ]
    for point in serial_points:
        assert point.report.num_finished == 400 and point.report.num_leaked_blocks == 0
        # Rescaling keeps the requests and spreads them over (n - 1) / rate seconds.
        assert point.report.duration_s >= 399 / point.rate_rps


def test_fcfs_attainment_does_not_rise_with_load(serial_points: list[SweepPoint]) -> None:
    fcfs = [p.report for p in serial_points if p.policy == "fcfs"]
    attainment = [r.slo_attainment for r in fcfs]
    assert attainment[0] == 1.0
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(attainment))
    assert attainment[-1] < 0.9  # overloaded at 60 req/s
    # Goodput follows the offered load until the SLOs break, then falls.
    assert fcfs[0].goodput_rps == pytest.approx(20.0, rel=0.05)
    assert fcfs[-1].goodput_rps < fcfs[1].goodput_rps


def test_cache_aware_lpm_holds_more_goodput_under_overload(
    serial_points: list[SweepPoint],
) -> None:
    at_60 = {p.policy: p.report for p in serial_points if p.rate_rps == 60.0}
    assert at_60["lpm"].goodput_rps > at_60["fcfs"].goodput_rps
    assert at_60["lpm"].prefix_hit_rate > at_60["fcfs"].prefix_hit_rate


def test_parallel_sweep_gives_the_serial_numbers(
    sample: list[Request], serial_points: list[SweepPoint]
) -> None:
    finished: list[SweepPoint] = []
    parallel = sweep(
        sample, KVFlowConfig(), ["fcfs", "lpm"], RATES, jobs=2, on_point=finished.append
    )
    assert [_without_wall_time(p) for p in parallel] == [
        _without_wall_time(p) for p in serial_points
    ]
    assert sorted(id(p) for p in finished) == sorted(id(p) for p in parallel)


def _point(policy: str, rate: float, attainment: float) -> SweepPoint:
    empty = summarize(
        [],
        policy=policy,
        num_preemptions=0,
        prefix_hit_tokens=0,
        prefix_query_tokens=0,
        sim_steps=0,
        num_leaked_blocks=0,
        wall_s=0.0,
    )
    return SweepPoint(policy, rate, dataclasses.replace(empty, slo_attainment=attainment))


def test_capacity_is_the_highest_rate_held_without_a_gap() -> None:
    points = [
        _point("a", 1.0, 1.0),
        _point("a", 4.0, 0.95),
        _point("a", 2.0, 0.90),
        _point("a", 8.0, 0.5),
        _point("b", 1.0, 0.8),
        _point("b", 2.0, 0.95),  # above the target, but a lower rate already failed
        _point("c", 1.0, 0.99),
    ]
    assert capacity(points) == {"a": 4.0, "b": None, "c": 1.0}
    assert capacity(points, attainment_target=0.5)["a"] == 8.0


def test_sweep_refuses_bad_grids(sample: list[Request]) -> None:
    config = KVFlowConfig()
    with pytest.raises(ValueError, match="at least one policy"):
        sweep(sample, config, [], RATES)
    with pytest.raises(ValueError, match="> 0"):
        sweep(sample, config, ["fcfs"], [10.0, 0.0])
    with pytest.raises(ValueError, match="two requests"):
        sweep(sample[:1], config, ["fcfs"], [10.0])
    with pytest.raises(ValueError, match="jobs"):
        sweep(sample, config, ["fcfs"], [10.0], jobs=0)


def test_cli_sweep_writes_the_curve_capacity_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    args = ["sweep", "-p", "fcfs", "-p", "lpm", "--rate", "60,20", "--rate", "40"]
    # The parallel path is covered above; one process keeps this test light.
    assert main([*args, "--jobs", "1", "--json", str(out), "--plot", str(plots)]) == 0
    text = capsys.readouterr().out
    assert "goodput" in text and "capacity (SLO met >= 90%)" in text
    doc = json.loads(out.read_text())
    assert list(doc) == [
        "schema_version", "trace", "engine", "attainment_target", "sweep", "capacity",
        "config", "slo",
    ]  # fmt: skip
    rows = doc["sweep"]
    assert [(r["policy"], r["rate_rps"]) for r in rows] == [
        (policy, rate) for policy in ("fcfs", "lpm") for rate in RATES
    ]
    assert list(rows[0])[:4] == ["policy", "rate_rps", "goodput_rps", "slo_attainment"]
    assert {"ttft_ms", "tpot_ms", "queue_ms", "kv_wait_ms", "per_tenant"} <= set(rows[0])
    assert doc["capacity"] == {"fcfs": 40.0, "lpm": 40.0}
    assert doc["attainment_target"] == 0.9 and doc["config"]["kv"]["block_size"] == 16
    assert png_size(plots / "sweep.png") == (700, 700)


def test_cli_sweep_slo_flags_move_the_curve(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    args = ["sweep", "-p", "fcfs", "--rate", "60", "--jobs", "1", "--json", str(out)]
    assert main([*args, "--ttft-slo-ms", "60000", "--tpot-slo-ms", "1000", "--slo-override"]) == 0
    doc = json.loads(out.read_text())
    assert doc["sweep"][0]["slo_attainment"] == 1.0
    assert doc["slo"] == {"ttft_ms": 60000.0, "tpot_ms": 1000.0, "per_tenant": {}, "override": True}
    assert doc["capacity"] == {"fcfs": 60.0}


def test_cli_sweep_needs_rates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sweep", "-p", "fcfs"])
    assert "--rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--rate", "1,x"])
    assert "1,x" in capsys.readouterr().err


def test_cli_sweep_over_fleet_sizes_and_routers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, out = tmp_path / "conv.jsonl", tmp_path / "sweep.json"
    requests = conversations(num_sessions=40)
    dump_native(requests, trace)
    args = [
        "sweep", str(trace), "-p", "fcfs", "--rate", "8,16", "--instances", "2,4",
        "--router", "round-robin,cache-aware", "--set", "kv.device.num_blocks=300",
        "--ttft-slo-ms", "500", "--jobs", "1", "--json", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "cache-aware/fcfs x4" in text and "capacity (SLO met >= 90%)" in text
    doc = json.loads(out.read_text())
    rows = doc["sweep"]
    # One row per combination: policy, then instances, then router, then rate.
    assert [(r["instances"], r["router"], r["rate_rps"]) for r in rows] == [
        (n, router, rate)
        for n in (2, 4)
        for router in ("round-robin", "cache-aware")
        for rate in (8.0, 16.0)
    ]
    assert list(rows[0])[:7] == [
        "policy", "instances", "router", "peers", "rate_rps", "goodput_rps", "slo_attainment",
    ]  # fmt: skip
    assert all("wall_s" not in r and r["num_requests"] == len(requests) for r in rows)
    assert [len(r["fleet"]["routed_requests"]) for r in rows] == [2] * 4 + [4] * 4
    assert list(doc["capacity"]) == [
        "round-robin/fcfs x2", "cache-aware/fcfs x2", "round-robin/fcfs x4", "cache-aware/fcfs x4",
    ]  # fmt: skip
    by_key = {(r["instances"], r["router"], r["rate_rps"]): r for r in rows}
    for n in (2, 4):
        for rate in (8.0, 16.0):
            rr, ca = (by_key[n, r, rate]["prefix_hit_rate"] for r in ("round-robin", "cache-aware"))
            assert ca > rr
    # A point is the fleet replay it names: the same figures as replaying it directly.
    config = KVFlowConfig.from_dict({}, {"kv.device.num_blocks": 300})
    loaded = SLOSettings(ttft_ms=500.0).apply(load_trace(trace))
    direct = summarize_fleet(run_fleet(scale_to_rate(loaded, 16.0), config, 4, "cache-aware"))
    assert by_key[4, "cache-aware", 16.0]["ttft_ms"] == direct.to_json()["ttft_ms"]


def test_cli_sweep_fleet_flags_need_instances(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--rate", "10", "--router", "cache-aware"]) == 2
    assert "--router and --peers need --instances" in capsys.readouterr().err
    assert main(["sweep", "--rate", "10", "--instances", "2", "--router", "nope"]) == 2
    assert "unknown router 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--rate", "10", "--instances", "0,2"])
    assert "instance counts >= 1" in capsys.readouterr().err


def test_cli_sweep_starts_no_more_processes_than_points(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One point: --jobs 8 must not fork 8 workers for it (nor --jobs 100000 that many).
    args = ["sweep", "-p", "fcfs", "--rate", "60", "--limit", "20", "--jobs", "8"]
    assert main(args) == 0
    title = next(line for line in capsys.readouterr().out.splitlines() if "kvflow sweep:" in line)
    assert title.strip().endswith("| 1 job"), title
