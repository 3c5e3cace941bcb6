"""Prefill/decode disaggregation in virtual time (`replay_fleet(..., pd=(P, D))`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvflow.cluster.fleet import FleetResult, replay_identical_fleet
from kvflow.config import KVFlowConfig
from kvflow.request import SLO, Request
from kvflow.traces.native import dump_native
from kvflow.traces.outcome import request_outcome
from tests.cli_run import CLI
from tests.fleet_helpers import assert_fleet_wide_is_the_full_report_less_its_fleet_figures
from tests.integration.test_cli_refusals import assert_one_line_error


def workload(
    n: int, prompt_len: int, output_len: int, rate: float, slo: SLO, seed: int = 0
) -> list[Request]:
    """Poisson arrivals of random prompts (no shared prefixes)."""
    rng = random.Random(seed)
    t = 0.0
    requests = []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(1, 30000) for _ in range(prompt_len)]
        requests.append(Request(f"r{i}", prompt, output_len, arrival_time=t, slo=slo))
    return requests


def run(requests: list[Request], pd: tuple[int, int] | None, gbps: float = 12.0) -> FleetResult:
    config = KVFlowConfig().with_overrides(
        {"kv.transfer.peer_gbps": gbps, "kv.device.num_blocks": 4000}
    )
    return replay_identical_fleet(
        requests, config, 2, "fcfs", "cache-aware", pd=pd, check_integrity=True
    )


def attainment(result: FleetResult) -> float:
    states = result.states
    return sum(request_outcome(s).met for s in states) / len(states)


def test_one_prefill_one_decode_serves_every_request_in_full() -> None:
    requests = workload(20, 300, 12, rate=20.0, slo=SLO())
    result = run(requests, (1, 1))
    by_id = {s.request_id: s for s in result.states}
    assert len(by_id) == len(requests)
    prefill, decode = result.instances
    assert (prefill.role, decode.role) == ("prefill", "decode")
    assert [r.num_leaked_blocks for r in result.instances] == [0, 0]
    prefill_first = {s.request_id: s.first_token_time for s in prefill.states}
    handoffs = {h.request_id: h for h in result.handoffs}
    bs = KVFlowConfig().kv.block_size
    for request in requests:
        state = by_id[request.request_id]
        assert state.num_output_tokens == request.max_new_tokens
        assert len(state.token_times) == request.max_new_tokens
        # TTFT ends at the prefill instance's first token; the second token comes
        # after the handoff landed.
        assert state.first_token_time == prefill_first[request.request_id]
        handoff = handoffs[request.request_id]
        assert handoff.num_tokens == 300 // bs * bs
        assert state.token_times[0] <= handoff.start < handoff.end <= state.token_times[1]
        assert state.token_times == sorted(state.token_times)
    # The decode instance found every full prompt block cached: it computed at most
    # the partial tail block and the first token, never a prompt's prefill.
    for state in decode.states:
        assert state.num_cached_tokens == 300 // bs * bs
    assert result.pd_handoff_bytes == sum(h.num_bytes for h in result.handoffs) > 0


def test_disaggregation_is_deterministic() -> None:
    requests = workload(20, 300, 12, rate=20.0, slo=SLO())
    a, b = run(requests, (1, 1)), run(requests, (1, 1))
    assert [s.token_times for s in a.states] == [s.token_times for s in b.states]
    assert a.handoffs == b.handoffs


def test_a_pd_fleets_wide_report_alone_is_the_full_report_less_its_fleet_figures() -> None:
    # (A colocated fleet's: test_peers_pull_prefixes_and_count_them_as_peer_hits.)
    requests = workload(20, 300, 12, rate=20.0, slo=SLO(ttft_ms=200.0, tpot_ms=20.0))
    assert_fleet_wide_is_the_full_report_less_its_fleet_figures(run(requests, (1, 1)))


def test_pd_must_cover_the_fleet() -> None:
    with pytest.raises(ValueError, match="pd=2:1"):
        run(workload(2, 64, 4, rate=1.0, slo=SLO()), (2, 1))


# The crossover, on the llama3-8b-h100 latency model (kvflow's default): 100 requests
# of 2,048-token prompts and 16 output tokens at 10 per second, SLOs TTFT 1 s and
# TPOT 8 ms. Colocated, each 2,048-token prefill (~70 ms) stalls the other requests'
# decode steps (~6 ms each), so many miss TPOT (~55% attain); one prefill instance
# keeps up with the arrivals (~65% busy), and the decode instance's steps hold
# decodes only. At 12 GB/s a handoff takes ~11 ms: disaggregated attains ~100%. At
# 0.1 GB/s it takes ~1.3 s, between the first and second token: it attains ~0%.
CROSSOVER_SLO = SLO(ttft_ms=1000.0, tpot_ms=8.0)


def test_disaggregation_wins_with_long_prompts_on_a_fast_network() -> None:
    requests = workload(100, 2048, 16, rate=10.0, slo=CROSSOVER_SLO)
    colocated, disaggregated = attainment(run(requests, None)), attainment(run(requests, (1, 1)))
    assert disaggregated >= 0.95
    assert colocated <= 0.75


def test_colocation_wins_on_a_slow_network() -> None:
    requests = workload(100, 2048, 16, rate=10.0, slo=CROSSOVER_SLO)
    colocated = attainment(run(requests, None, gbps=0.1))
    disaggregated = attainment(run(requests, (1, 1), gbps=0.1))
    assert colocated >= 0.4
    assert disaggregated <= 0.1


def test_cli_pd_report_and_errors(tmp_path: Path, cli: CLI) -> None:
    trace = tmp_path / "t.jsonl"
    dump_native(workload(12, 300, 8, rate=20.0, slo=SLO()), trace)
    out = tmp_path / "r.json"
    done = cli(
        "replay", str(trace), "--pd", "1:2", "--check-integrity", "--json", str(out), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "#0 prefill" in done.stdout and "#2 decode" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["fleet"]["num_instances"] == 3 and doc["fleet"]["pd"] == [1, 2]
    run_doc = doc["runs"][0]
    fleet = run_doc["fleet"]
    assert fleet["roles"] == ["prefill", "decode", "decode"]
    assert fleet["pd_handoffs"] == 12
    assert fleet["pd_handoff_bytes"] > 0
    assert fleet["per_role"]["decode"]["num_requests"] == 12
    assert run_doc["num_finished"] == 12
    assert run_doc["num_output_tokens"] == 12 * 8
    mismatch = cli("replay", str(trace), "--pd", "1:1", "--instances", "3", cwd=tmp_path)
    assert_one_line_error(mismatch, "--pd 1:1: P + D = 2, but --instances is 3")
    assert mismatch.returncode == 2
    bad = cli("replay", str(trace), "--pd", "2", cwd=tmp_path)
    assert_one_line_error(bad, "expected P:D")
    assert bad.returncode == 2
