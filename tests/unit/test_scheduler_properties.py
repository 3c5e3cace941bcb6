"""Property: random arrivals, lengths, aborts and tight block limits never break the
scheduler's invariants, and nothing leaks."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvflow.request import FinishReason, RequestStatus
from tests.builders import ScriptedRunner, make_request, make_scheduler

request_st = st.tuples(
    st.integers(min_value=0, max_value=8),  # arrival step
    st.integers(min_value=1, max_value=40),  # prompt length
    st.integers(min_value=1, max_value=30),  # max new tokens
    st.integers(min_value=0, max_value=3),  # shared-prefix group
    st.integers(min_value=0, max_value=3),  # priority
    st.sampled_from(["a", "b"]),  # tenant
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=2, max_size=14),
    abort_steps=st.dictionaries(st.integers(0, 13), st.integers(0, 12), max_size=6),
    num_blocks=st.integers(min_value=6, max_value=24),
    budget=st.integers(min_value=4, max_value=48),
    max_seqs=st.integers(min_value=1, max_value=6),
    policy=st.sampled_from(["fcfs", "lpm", "edf", "priority", "fair"]),
    block_size=st.sampled_from([2, 4]),
)
def test_invariants_hold_after_every_step_and_nothing_leaks(
    requests: list[tuple[int, int, int, int, int, str]],
    abort_steps: dict[int, int],
    num_blocks: int,
    budget: int,
    max_seqs: int,
    policy: str,
    block_size: int,
) -> None:
    if policy == "priority":
        from kvflow.policies.priority import PriorityPolicy

        chosen: str | PriorityPolicy = PriorityPolicy(preempt=True)
    else:
        chosen = policy
    sched = make_scheduler(
        chosen,
        **{
            "kv.block_size": block_size,
            "kv.device.num_blocks": num_blocks,
            "scheduler.max_num_batched_tokens": budget,
            "scheduler.max_num_seqs": max_seqs,
            "scheduler.long_prefill_threshold": max(1, budget // 2),
        },
    )
    runner = ScriptedRunner(step_s=0.01)
    states = {}
    now = 0.0
    for step in range(2000):
        for i, (arrive, plen, out, group, prio, tenant) in enumerate(requests):
            if arrive == step:
                prompt = [7000 + 100 * group + k for k in range(min(plen, 8))]
                prompt += [i * 1000 + k for k in range(plen - len(prompt))]
                req = make_request(
                    prompt,
                    out,
                    arrival=now,
                    request_id=f"q{i}",
                    priority=prio,
                    tenant=tenant,
                    ttft_ms=50.0 * (1 + group),
                )
                states[req.request_id] = sched.add(req, now)
        for idx, at_step in abort_steps.items():
            if at_step == step and idx < len(requests):
                sched.abort(f"q{idx}", now)
        if step > 8 and not sched.has_unfinished:
            break
        if sched.has_unfinished:
            plan = sched.plan(now)
            assert plan.num_scheduled_tokens <= budget
            result = runner.execute(plan)
            now += result.duration_s
            sched.commit(plan, result, now)
        sched.check_integrity()
    else:
        raise AssertionError("did not finish")
    event(f"preempted={min(sched.stats.num_preemptions, 1)}")
    event(f"aborted={min(sched.stats.num_aborted, 1)}")
    event(f"hits={min(sched.stats.prefix_hit_tokens, 1)}")
    assert sched.num_leaked_blocks() == 0
    assert sched.pool.num_used_blocks == 0
    # Prefix hits count first admissions only (vLLM's split): whatever preemptions did,
    # they add up to the requests' own num_cached_tokens over their prompts.
    admitted = [s for s in states.values() if s.first_scheduled_time is not None]
    stats = sched.stats
    assert stats.prefix_hit_tokens == sum(s.num_cached_tokens for s in admitted)
    assert stats.prefix_query_tokens == sum(s.num_prompt_tokens for s in admitted)
    assert sum(stats.hit_tokens_by_tier.values()) == stats.prefix_hit_tokens
    assert sum(stats.readmission_hit_tokens_by_tier.values()) == stats.readmission_hit_tokens
    if not stats.num_preemptions:
        assert stats.readmission_query_tokens == stats.readmission_hit_tokens == 0
    for state in states.values():
        assert state.status is RequestStatus.FINISHED
        assert not state.block_ids
        if state.finish_reason is FinishReason.LENGTH:
            assert state.num_output_tokens == state.max_new_tokens
