"""`kvflow plan` as a user runs it: the fleet size it returns meets the attainment target
when replayed independently, one instance fewer does not; the P:D split it returns meets
it, no split of one instance fewer does; and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvflow.cluster.fleet import replay_identical_fleet
from kvflow.cluster.prices import load_prices
from kvflow.config import KVFlowConfig
from kvflow.request import Request
from kvflow.traces import read_trace
from kvflow.traces.fleet_report import summarize_fleet
from kvflow.traces.shaping import time_scale
from kvflow.traces.slo import SLOSettings
from tests.cli_run import CLI
from tests.integration.test_cli_refusals import assert_one_line_error

TIMEOUT_S = 300
TTFT_MS, TPOT_MS, TARGET = 200.0, 40.0, 0.9


def kvflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "kvflow", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "synth.jsonl"
    done = kvflow(
        "synth", "-n", "200", "--rate", "40", "--prompt-len", "512", "--output-len", "64",
        "--seed", "1", str(path), cwd=path.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def planned(trace: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`kvflow plan --pd auto` at x1 and x8: its run and its JSON's `plan`."""
    out = trace.parent / "plan.json"
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", str(TTFT_MS), "--tpot-slo-ms", str(TPOT_MS),
        "--attainment", str(TARGET), "--rate-scale", "1,8", "--gpu", "h100",
        "--router", "cache-aware", "--pd", "auto", "--jobs", "2", "--json", str(out),
        cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())["plan"]


def _attainment(
    requests: list[Request], num_instances: int, pd: tuple[int, int] | None = None
) -> float:
    """Requests meeting every SLO / all requests, of a fleet replay done here (through
    the fleet replay API, not the planner's code) on the shipped h100 entry."""
    gpu = load_prices()["h100"]
    config = KVFlowConfig.load(None, gpu.config_overrides())
    result = replay_identical_fleet(requests, config, num_instances, "fcfs", "cache-aware", pd=pd)
    report = summarize_fleet(result).report
    assert report.num_requests == len(requests)
    return report.num_slo_met / report.num_requests


def _price(plan: dict[str, Any]) -> float:
    return float(plan["gpu"]["price_per_gpu_hour"] * plan["gpu"]["gpus_per_instance"])


def test_the_planned_size_meets_the_target_and_one_fewer_does_not(
    trace: Path, planned: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    done, plan = planned
    assert "kvflow plan" in done.stdout and "$/hour" in done.stdout
    loads = {load["rate_scale"]: load for load in plan["loads"]}
    assert set(loads) == {1.0, 8.0}
    base = SLOSettings(TTFT_MS, TPOT_MS).apply(read_trace(trace).requests)
    sizes = {}
    for scale, load in loads.items():
        n = load["num_instances"]
        assert isinstance(n, int) and 1 <= n <= 16
        sizes[scale] = n
        requests = time_scale(base, 1.0 / scale)
        assert _attainment(requests, n) >= TARGET
        if n > 1:
            assert _attainment(requests, n - 1) < TARGET
        # the cost follows from the size and the shipped price
        cost = load["cost"]
        price = _price(plan)
        assert cost["dollars_per_hour"] == pytest.approx(n * price)
        tokens_per_hour = load["at_n"]["output_tokens_per_s"] * 3600
        assert cost["dollars_per_million_output_tokens"] == pytest.approx(
            n * price / tokens_per_hour * 1e6
        )
    assert sizes[8.0] > 2  # eight times the load needs a fleet, found by bisection
    assert loads[8.0]["below"]["binding_constraint"] in ("ttft", "tpot", "memory")


def test_the_planned_split_meets_the_target_and_no_split_of_one_fewer_does(
    trace: Path, planned: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    done, plan = planned
    assert plan["pd_mode"] == "auto"
    base = SLOSettings(TTFT_MS, TPOT_MS).apply(read_trace(trace).requests)
    totals = {}
    for load in plan["loads"]:
        split = load["pd"]
        assert split is not None and split["fixed"] is False
        p, d = split["split"]
        total = split["num_instances"]
        assert p >= 1 and d >= 1 and p + d == total and total <= 16
        totals[load["rate_scale"]] = total
        requests = time_scale(base, 1.0 / load["rate_scale"])
        assert _attainment(requests, total, (p, d)) >= TARGET
        # the best split of its total: no split of it replayed had more attainment
        same = [e for e in split["evaluations"] if e["num_instances"] == total]
        assert {tuple(e["pd"]) for e in same} == {(q, total - q) for q in range(1, total)}
        assert split["at_n"]["attainment"] == max(e["attainment"] for e in same)
        for q in range(1, total - 1):  # every split of one instance fewer misses
            assert _attainment(requests, total - 1, (q, total - 1 - q)) < TARGET
        # both answers priced, and the cheaper named by $ per million output tokens
        assert split["cost"]["dollars_per_hour"] == pytest.approx(total * _price(plan))
        ours = split["cost"]["dollars_per_million_output_tokens"]
        theirs = load["cost"]["dollars_per_million_output_tokens"]
        assert load["cheaper"] == ("pd" if ours < theirs else "colocated")
    assert totals[1.0] == 2  # the smallest split fleet, 1P:1D, meets the trace's own rate
    assert totals[8.0] > 3  # eight times the load: found by the search, not the floor
    rows = [line for line in done.stdout.splitlines() if line.startswith("x")]
    assert len(rows) == 4 and "colocated" in rows[0] and "1P:1D" in rows[1]


def test_a_fixed_split_is_replayed_and_a_miss_fails_with_a_message(trace: Path) -> None:
    out = trace.parent / "fixed.json"
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", str(TTFT_MS), "--tpot-slo-ms", str(TPOT_MS),
        "--rate-scale", "1,8", "--pd", "1:1", "--jobs", "2", "--json", str(out),
        cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 1
    assert_one_line_error(done, "kvflow: error: x8: --pd 1:1: SLO attainment", "< 90%")
    loads = {load["rate_scale"]: load for load in json.loads(out.read_text())["plan"]["loads"]}
    met, missed = loads[1.0]["pd"], loads[8.0]["pd"]
    assert met["fixed"] and met["split"] == [1, 1] and met["num_instances"] == 2
    assert len(met["evaluations"]) == 1 and met["cost"]["num_gpus"] == 2
    assert missed["num_instances"] is None and missed["cost"] is None
    assert missed["below"]["pd"] == [1, 1] and missed["below"]["attainment"] < TARGET
    assert loads[8.0]["num_instances"] > 2  # the colocated search ran as ever


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--pd", "0:2"], ["--pd", "'0:2'", "auto, off or P:D"]),
        (["--pd", "x"], ["--pd", "'x'"]),
        (["--pd", "2:"], ["--pd", "'2:'"]),
        (["--pd", "auto", "--max-instances", "1"], ["--pd auto", "--max-instances >= 2"]),
    ],
)
def test_a_bad_pd_is_refused(trace: Path, args: list[str], needles: list[str], cli: CLI) -> None:
    done = cli("plan", str(trace), "--ttft-slo-ms", "200", *args, cwd=trace.parent)
    assert_one_line_error(done, *needles)
    assert done.returncode == 2


def test_an_unreachable_slo_fails_with_a_message(trace: Path, cli: CLI) -> None:
    done = cli(
        "plan", str(trace), "--ttft-slo-ms", "1", "--rate-scale", "4",
        "--max-instances", "2", "--jobs", "1", cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "kvflow: error: x4: SLO attainment" in done.stderr
    assert "even at --max-instances 2 (most failures: ttft)" in done.stderr


def test_a_bad_prices_file_and_an_unknown_gpu(trace: Path, cli: CLI) -> None:
    bad = trace.parent / "prices.toml"
    bad.write_text("[gpu.mine]\nprice_per_gpu_hour = 'cheap'\n")
    done = cli(
        "plan", str(trace), "--ttft-slo-ms", "200", "--prices", str(bad), "--gpu", "mine",
        cwd=trace.parent,
    )  # fmt: skip
    assert_one_line_error(done, str(bad), "gpu.mine.price_per_gpu_hour", "'cheap'")
    assert done.returncode == 2
    done = cli("plan", str(trace), "--ttft-slo-ms", "200", "--gpu", "b200", cwd=trace.parent)
    assert_one_line_error(done, "unknown gpu 'b200'", "known: 4xh100, cpu, h100")
    assert done.returncode == 2


def test_a_plan_without_slos_is_refused(trace: Path, cli: CLI) -> None:
    done = cli("plan", str(trace), cwd=trace.parent)
    assert_one_line_error(done, "--ttft-slo-ms")
    assert done.returncode == 2


def test_a_plan_starts_no_more_processes_than_fleets_to_replay(trace: Path) -> None:
    # --max-instances 2: two colocated fleets at most, so two workers, not eight.
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", "200", "--max-instances", "2", "--jobs", "8",
        cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "200 requests, 2 job(s)" in done.stdout, done.stdout
