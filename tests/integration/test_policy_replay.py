"""Policies through the whole scheduler and the virtual-time replay."""

from __future__ import annotations

from kvflow.policies.lpm import LPMPolicy
from kvflow.policies.priority import PriorityPolicy
from kvflow.request import FinishReason, Request
from kvflow.traces.replay import replay
from tests.builders import ScriptedRunner, make_config, make_request

STEP_S = 0.01


def _hot_stream_with_one_miss() -> tuple[list[Request], str]:
    hot_prefix = list(range(64))
    requests = [
        make_request(
            [*hot_prefix, 10_000 + i], max_new_tokens=5, arrival=0.03 * i, request_id=f"hot{i}"
        )
        for i in range(100)
    ]
    miss = make_request(
        list(range(50_000, 50_065)), max_new_tokens=5, arrival=0.05, request_id="miss"
    )
    return [*requests, miss], miss.request_id


def _queue_wait_of(policy: LPMPolicy, request_id: str, requests: list[Request]) -> float:
    config = make_config(**{"kv.block_size": 4, "scheduler.max_num_seqs": 1})
    result = replay(requests, config, policy, ScriptedRunner(step_s=STEP_S), check_integrity=True)
    state = next(s for s in result.states if s.request_id == request_id)
    assert state.finish_reason is FinishReason.LENGTH
    assert state.first_scheduled_time is not None
    return state.first_scheduled_time - state.arrival_time


def test_lpm_aging_bounds_how_long_a_cache_miss_is_passed_over() -> None:
    requests, miss = _hot_stream_with_one_miss()
    max_wait_s = 0.5
    one_request_s = 6 * STEP_S  # prefill + decodes of the request holding the only slot
    aged = _queue_wait_of(LPMPolicy(max_wait_s=max_wait_s), miss, requests)
    assert aged <= max_wait_s + one_request_s + STEP_S
    # Without a meaningful bound the hits keep jumping ahead of the miss for much longer.
    starved = _queue_wait_of(LPMPolicy(max_wait_s=1e9), miss, requests)
    assert starved > 4 * max_wait_s


def _deadline_workload() -> list[Request]:
    # All arrive together; one batch slot, so the order decides every TTFT.
    return [
        make_request(8, max_new_tokens=20, request_id="loose", ttft_ms=500.0, base=100),
        make_request(8, max_new_tokens=20, request_id="tight", ttft_ms=50.0, base=200),
        make_request(8, max_new_tokens=20, request_id="middle", ttft_ms=300.0, base=300),
    ]


def _ttft_misses(policy: str) -> list[str]:
    config = make_config(**{"scheduler.max_num_seqs": 1})
    result = replay(_deadline_workload(), config, policy, ScriptedRunner(step_s=STEP_S))
    misses = []
    for s in result.states:
        assert s.first_token_time is not None and s.request.slo.ttft_ms is not None
        if (s.first_token_time - s.arrival_time) * 1000 > s.request.slo.ttft_ms:
            misses.append(s.request_id)
    return misses


def test_edf_meets_every_deadline_where_fcfs_misses_some() -> None:
    assert _ttft_misses("edf") == []
    assert "tight" in _ttft_misses("fcfs")


def test_priority_preemption_lets_an_important_request_in() -> None:
    requests = [
        make_request(8, max_new_tokens=50, request_id="low", priority=5, base=100),
        make_request(8, max_new_tokens=5, arrival=0.1, request_id="high", priority=0, base=200),
    ]
    config = make_config(**{"scheduler.max_num_seqs": 1})
    with_preempt = replay(requests, config, PriorityPolicy(preempt=True), ScriptedRunner())
    without = replay(requests, config, PriorityPolicy(preempt=False), ScriptedRunner())
    by_id = {s.request_id: s for s in with_preempt.states}
    assert by_id["low"].num_preemptions == 1
    assert by_id["high"].finish_time is not None and by_id["low"].finish_time is not None
    assert by_id["high"].finish_time < by_id["low"].finish_time
    assert without.stats.num_preemptions == 0
    assert all(s.finish_reason is FinishReason.LENGTH for s in with_preempt.states)


def test_fair_share_protects_a_light_tenant_from_a_heavy_one() -> None:
    heavy = [
        make_request(
            16, max_new_tokens=10, arrival=0.0, request_id=f"h{i}", tenant="heavy", base=1000 * i
        )
        for i in range(30)
    ]
    light = [
        make_request(
            16,
            max_new_tokens=10,
            arrival=0.001,
            request_id=f"l{i}",
            tenant="light",
            base=500_000 + 1000 * i,
        )
        for i in range(3)
    ]
    config = make_config(**{"scheduler.max_num_seqs": 2})

    def light_ttft(policy: str) -> float:
        result = replay([*heavy, *light], config, policy, ScriptedRunner())
        ttfts = [
            s.first_token_time - s.arrival_time
            for s in result.states
            if s.tenant == "light" and s.first_token_time is not None
        ]
        assert len(ttfts) == 3
        return max(ttfts)

    assert light_ttft("fair") < light_ttft("fcfs") / 3


def test_replay_is_deterministic() -> None:
    requests, _ = _hot_stream_with_one_miss()
    config = make_config(
        **{"kv.block_size": 4, "scheduler.max_num_seqs": 4, "kv.device.num_blocks": 40}
    )

    def fingerprint() -> list[tuple[str, list[float], int]]:
        result = replay(requests, config, "lpm")
        return [(s.request_id, s.token_times, s.num_preemptions) for s in result.states]

    assert fingerprint() == fingerprint()


def test_on_the_bundled_sample_lpm_hits_more_and_edf_meets_more_slos_than_fcfs() -> None:
    from kvflow.config import KVFlowConfig
    from kvflow.traces import bundled_sample_path, load_trace
    from kvflow.traces.metrics import summarize

    requests = load_trace(bundled_sample_path())
    config = KVFlowConfig.load()
    reports = {}
    for policy in ("fcfs", "lpm", "edf"):
        result = replay(requests, config, policy)
        assert result.num_leaked_blocks == 0
        reports[policy] = summarize(
            result.states,
            policy=policy,
            num_preemptions=result.stats.num_preemptions,
            prefix_hit_tokens=result.stats.prefix_hit_tokens,
            prefix_query_tokens=result.stats.prefix_query_tokens,
            sim_steps=result.stats.num_steps,
            num_leaked_blocks=result.num_leaked_blocks,
            wall_s=result.wall_s,
        )
    assert reports["lpm"].prefix_hit_rate > reports["fcfs"].prefix_hit_rate + 0.03
    assert reports["edf"].slo_attainment > reports["fcfs"].slo_attainment + 0.1
