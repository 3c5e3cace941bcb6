"""`kvflow plan` as a user runs it: the fleet size it returns meets the attainment target
when replayed independently, one instance fewer does not; and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.cluster import routers
from kvflow.cluster.fleet import replay_fleet
from kvflow.cluster.prices import load_prices
from kvflow.config import KVFlowConfig
from kvflow.policies import make_policy
from kvflow.request import Request
from kvflow.traces import read_trace
from kvflow.traces.fleet_report import summarize_fleet
from kvflow.traces.shaping import time_scale
from kvflow.traces.slo import SLOSettings
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


def _attainment(requests: list[Request], num_instances: int) -> float:
    """Requests meeting every SLO / all requests, of a fleet replay done here (through
    the fleet replay API, not the planner's code) on the shipped h100 entry."""
    gpu = load_prices()["h100"]
    config = KVFlowConfig.load(None, gpu.config_overrides())
    configs = [config] * num_instances
    result = replay_fleet(
        requests,
        configs,
        [make_policy("fcfs", c) for c in configs],
        routers.create("cache-aware", config),
    )
    report = summarize_fleet(result).report
    assert report.num_requests == len(requests)
    return report.num_slo_met / report.num_requests


def test_the_planned_size_meets_the_target_and_one_fewer_does_not(trace: Path) -> None:
    out = trace.parent / "plan.json"
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", str(TTFT_MS), "--tpot-slo-ms", str(TPOT_MS),
        "--attainment", str(TARGET), "--rate-scale", "1,8", "--gpu", "h100",
        "--router", "cache-aware", "--jobs", "2", "--json", str(out), cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "kvflow plan" in done.stdout and "$/hour" in done.stdout
    plan = json.loads(out.read_text())["plan"]
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
        price = plan["gpu"]["price_per_gpu_hour"] * plan["gpu"]["gpus_per_instance"]
        assert cost["dollars_per_hour"] == pytest.approx(n * price)
        tokens_per_hour = load["at_n"]["output_tokens_per_s"] * 3600
        assert cost["dollars_per_million_output_tokens"] == pytest.approx(
            n * price / tokens_per_hour * 1e6
        )
    assert sizes[8.0] > 2  # eight times the load needs a fleet, found by bisection
    assert loads[8.0]["below"]["binding_constraint"] in ("ttft", "tpot", "memory")


def test_an_unreachable_slo_fails_with_a_message(trace: Path) -> None:
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", "1", "--rate-scale", "4",
        "--max-instances", "2", "--jobs", "1", cwd=trace.parent,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "kvflow: error: x4: SLO attainment" in done.stderr
    assert "even at --max-instances 2 (most failures: ttft)" in done.stderr


def test_a_bad_prices_file_and_an_unknown_gpu(trace: Path) -> None:
    bad = trace.parent / "prices.toml"
    bad.write_text("[gpu.mine]\nprice_per_gpu_hour = 'cheap'\n")
    done = kvflow(
        "plan", str(trace), "--ttft-slo-ms", "200", "--prices", str(bad), "--gpu", "mine",
        cwd=trace.parent,
    )  # fmt: skip
    assert_one_line_error(done, str(bad), "gpu.mine.price_per_gpu_hour", "'cheap'")
    assert done.returncode == 2
    done = kvflow("plan", str(trace), "--ttft-slo-ms", "200", "--gpu", "b200", cwd=trace.parent)
    assert_one_line_error(done, "unknown gpu 'b200'", "known: 4xh100, cpu, h100")
    assert done.returncode == 2


def test_a_plan_without_slos_is_refused(trace: Path) -> None:
    done = kvflow("plan", str(trace), cwd=trace.parent)
    assert_one_line_error(done, "--ttft-slo-ms")
    assert done.returncode == 2
