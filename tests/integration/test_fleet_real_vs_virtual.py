"""The same router in both clocks: a multi-turn trace from `kvflow synth`, replayed in
real time through `kvflow cluster up --instances 4 --engine sim` (`kvflow replay
--endpoint ROUTER_URL`, whose report has the fleet's figures from the router's and the
instances' /metrics), and in virtual time (`kvflow replay --instances 4 --router R`):
the fleet-wide prefix hit rate and the instances' request shares agree within 10%.

Shares are compared as the fleet's distribution (sorted): the instances are alike, and
which of several idle, empty instances takes a new conversation is a tie whose winner's
number differs between the clocks (the real run's probe request is routed first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster_process import SIM, cluster, kvflow

# Each step costs 2 ms, each prompt token 20 us, each running sequence 50 us.
LATENCY = [*SIM, "--set", "sim.prefill_token_us=20", "--set", "sim.decode_seq_us=50"]


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "conversations.jsonl"
    done = kvflow(
        "synth", str(path), "--sessions", "16", "--rate", "6", "--turns", "3",
        "--think-time", "0.4", "--prompt-len", "60:120", "--output-len", "8:24",
        "--system-prompts", "3", "--system-prompt-len", "256", "--seed", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


def _shares(routed: list[int]) -> list[float]:
    return sorted(n / sum(routed) for n in routed)


@pytest.mark.parametrize("router", ["cache-aware"])
def test_a_real_fleet_routes_like_the_virtual_one(trace: Path, tmp_path: Path, router: str) -> None:
    virtual_json = tmp_path / "virtual.json"
    done = kvflow(
        "replay", str(trace), "--instances", "4", "--router", router, *LATENCY,
        "--json", str(virtual_json),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    virtual = json.loads(virtual_json.read_text())["runs"][0]
    real_json = tmp_path / "real.json"
    with cluster(tmp_path / "cluster", 4, "--router", router, *LATENCY) as c:
        done = kvflow(
            "replay", str(trace), "--endpoint", c.url, "--vocab-size", str(2**32),
            "--json", str(real_json),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "prefix hit rate" in done.stdout and c.instances[0]["url"] in done.stdout
    real = json.loads(real_json.read_text())["runs"][0]
    fleet = real["fleet"]
    assert fleet["router"] == router
    assert [row["instance"] for row in fleet["per_instance"]] == [p["url"] for p in c.instances]
    assert sum(fleet["routed_requests"]) == real["num_requests"] == 48
    assert all(row["num_finished"] == row["routed_requests"] for row in fleet["per_instance"])
    hit_virtual, hit_real = virtual["prefix_hit_rate"], fleet["prefix_hit_rate"]
    assert hit_virtual > 0.5  # conversations under shared system prompts hit
    assert abs(hit_real - hit_virtual) <= 0.10 * hit_virtual, (hit_real, hit_virtual)
    share_virtual = _shares(virtual["fleet"]["routed_requests"])
    share_real = _shares(fleet["routed_requests"])
    for r, v in zip(share_real, share_virtual, strict=True):
        assert abs(r - v) <= 0.10, (share_real, share_virtual)
