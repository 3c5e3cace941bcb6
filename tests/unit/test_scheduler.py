"""The step planner: budget, chunking, prefix hits, sharing, admission, abort, preemption."""

from __future__ import annotations

import pytest

from kvflow.request import FinishReason, RequestStatus
from kvflow.scheduler import StepPlan, StepResult
from tests.builders import ScriptedRunner, make_request, make_scheduler, run_to_completion


def test_chunked_prefill_respects_budget_threshold_and_never_starves_decodes() -> None:
    budget, threshold = 64, 24
    sched = make_scheduler(
        **{
            "scheduler.max_num_batched_tokens": budget,
            "scheduler.long_prefill_threshold": threshold,
            "scheduler.max_num_seqs": 16,
            "kv.block_size": 4,
            "kv.device.num_blocks": 1024,
        }
    )
    # A few short requests that start decoding early, then long prompts arriving later.
    for i in range(4):
        sched.add(make_request(8, max_new_tokens=40, base=100 * i))
    runner = ScriptedRunner()
    now = 0.0
    long_added = False
    for step in range(400):
        if not sched.has_unfinished:
            break
        if step == 3 and not long_added:
            for i in range(6):
                sched.add(make_request(200, max_new_tokens=3, base=10_000 + 1000 * i))
            long_added = True
        decoding = {
            r.request_id for r in sched.running if r.num_tokens - r.num_computed_tokens == 1
        }
        plan = sched.plan(now)
        assert plan.num_scheduled_tokens <= budget
        scheduled = {r.request_id for r in plan.requests}
        assert decoding <= scheduled, "a decoding request was left out of a step"
        for r, n in zip(plan.requests, plan.num_tokens, strict=True):
            assert 1 <= n <= threshold, (r.request_id, n)
        result = runner.execute(plan)
        now += result.duration_s
        sched.commit(plan, result, now)
        sched.check_integrity()
    assert not sched.has_unfinished
    assert long_added
    # Long prompts needed several chunks each.
    assert any(n == threshold for p in runner.plans for n in p.num_tokens)


def test_prefix_hits_are_counted_exactly() -> None:
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    a = sched.add(make_request(list(range(10)), max_new_tokens=2, request_id="a"))
    run_to_completion(sched)
    assert a.num_cached_tokens == 0
    # Same first 8 tokens (2 full blocks), then different.
    b = sched.add(make_request([*range(8), 99, 98, 97], max_new_tokens=1, request_id="b"))
    # Identical 10-token prompt: 2 full blocks cached, the partial third is not a block.
    c = sched.add(make_request(list(range(10)), max_new_tokens=1, request_id="c"))
    # Exactly 8 tokens, both blocks cached: the last block is recomputed so the step has
    # a token to sample from, so only 4 tokens count as hits.
    d = sched.add(make_request(list(range(8)), max_new_tokens=1, request_id="d"))
    # Diverges inside the first block: no hit.
    e = sched.add(make_request([0, 1, 2, 50, 4, 5, 6, 7, 8], max_new_tokens=1, request_id="e"))
    run_to_completion(sched)
    assert [x.num_cached_tokens for x in (b, c, d, e)] == [8, 8, 4, 0]
    assert sched.stats.prefix_hit_tokens == 8 + 8 + 4
    assert sched.stats.prefix_query_tokens == 10 + 11 + 10 + 8 + 9


def test_output_blocks_are_cached_for_the_next_turn() -> None:
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    first = sched.add(make_request(list(range(6)), max_new_tokens=6, request_id="t1"))
    run_to_completion(sched, ScriptedRunner(token=5))
    history = first.token_ids  # 6 prompt + 6 output tokens = 3 full blocks
    assert len(history) == 12
    second = sched.add(make_request([*history, 77, 78], max_new_tokens=1, request_id="t2"))
    run_to_completion(sched)
    # Blocks 0-1 are computed, block 2's last token was sampled but never fed, so only
    # 8 tokens were cached.
    assert second.num_cached_tokens == 8


def test_inbatch_prefix_sharing_computes_a_shared_prefix_once() -> None:
    prefix = list(range(500, 532))  # 8 blocks of 4

    def hits(sharing: bool) -> tuple[int, int]:
        sched = make_scheduler(
            **{
                "kv.block_size": 4,
                "kv.device.num_blocks": 256,
                "scheduler.enable_inbatch_prefix_sharing": sharing,
            }
        )
        states = [
            sched.add(make_request([*prefix, 1000 + i, 2000 + i], max_new_tokens=2))
            for i in range(3)
        ]
        run_to_completion(sched)
        return sched.stats.prefix_hit_tokens, sum(s.num_cached_tokens for s in states)

    assert hits(sharing=True) == (64, 64)  # the two followers each hit the 32-token prefix
    assert hits(sharing=False) == (0, 0)  # all three computed it in the same step


def test_requests_that_can_never_fit_are_rejected_with_a_reason() -> None:
    sched = make_scheduler(
        **{"kv.block_size": 4, "kv.device.num_blocks": 8, "scheduler.max_model_len": 40}
    )
    too_long = sched.add(make_request(30, max_new_tokens=20))
    too_big = sched.add(make_request(30, max_new_tokens=5))  # 35 tokens = 9 blocks > 8
    fits = sched.add(make_request(20, max_new_tokens=4))
    for state in (too_long, too_big):
        assert state.status is RequestStatus.FINISHED
        assert state.finish_reason is FinishReason.REJECTED
    assert "50 exceeds max_model_len (40)" in too_long.finish_detail
    assert "needs 9 blocks" in too_big.finish_detail and "holds 8" in too_big.finish_detail
    run_to_completion(sched)
    assert fits.finish_reason is FinishReason.LENGTH
    assert sched.stats.num_rejected == 2


def test_abort_frees_blocks_of_waiting_and_running_requests() -> None:
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    running = sched.add(make_request(20, max_new_tokens=50))
    waiting = sched.add(make_request(20, max_new_tokens=50, base=5000))
    sched.add(make_request(20, max_new_tokens=3, base=9000))
    runner = ScriptedRunner()
    plan = sched.plan(0.0)
    assert running in plan.requests
    sched.commit(plan, runner.execute(plan), 0.01)
    used_before = sched.pool.num_used_blocks
    assert sched.abort(running.request_id, 0.02) is running
    assert running.finish_reason is FinishReason.ABORTED and not running.block_ids
    assert sched.pool.num_used_blocks < used_before
    assert sched.abort(waiting.request_id, 0.02) is waiting
    assert sched.abort("no-such-id", 0.02) is None
    sched.check_integrity()
    run_to_completion(sched)
    assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0


def test_abort_between_plan_and_commit_skips_the_entry() -> None:
    sched = make_scheduler(**{"kv.block_size": 4})
    a = sched.add(make_request(8, max_new_tokens=5))
    plan = sched.plan(0.0)
    sched.abort(a.request_id, 0.0)
    sched.commit(plan, ScriptedRunner().execute(plan), 0.01)
    assert a.num_output_tokens == 0 and a.finish_reason is FinishReason.ABORTED
    sched.check_integrity()


def test_preemption_under_a_tiny_device_tier_still_finishes_everything() -> None:
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 12})
    states = [sched.add(make_request(10, max_new_tokens=20, base=100 * i)) for i in range(5)]
    run_to_completion(sched)
    assert sched.stats.num_preemptions > 0
    assert all(s.finish_reason is FinishReason.LENGTH for s in states)
    assert all(s.num_output_tokens == 20 for s in states)
    assert sched.num_leaked_blocks() == 0


# (shared prefix: group and tokens, own tokens, output tokens, arrival s, priority):
# found by a search, it livelocked: a request whose loaded prefix landed first had no
# victim but itself (the other admitted request was still loading, which no victim
# choice sees), preempted itself, and the two undid each other step after step.
LOADS_AND_PRIORITIES = [
    ((0, 0), 6, 3, 0.02, 2),
    ((1, 4), 1, 1, 0.04, 1),
    ((0, 0), 3, 1, 0.06, 1),
    ((1, 4), 3, 3, 0.06, 1),
    ((1, 6), 4, 5, 0.06, 2),
    ((0, 0), 5, 3, 0.08, 2),
    ((2, 2), 2, 6, 0.10, 2),
    ((2, 8), 3, 2, 0.10, 1),
    ((2, 2), 3, 1, 0.10, 2),
    ((1, 8), 6, 5, 0.10, 1),
    ((2, 6), 1, 3, 0.12, 2),
    ((1, 8), 3, 6, 0.12, 2),
    ((1, 4), 1, 1, 0.12, 2),
    ((2, 2), 4, 1, 0.14, 0),
    ((0, 0), 4, 1, 0.14, 2),
    ((0, 0), 3, 4, 0.16, 2),
    ((1, 8), 2, 5, 0.16, 0),
    ((1, 6), 2, 5, 0.16, 0),
    ((2, 6), 6, 4, 0.18, 1),
    ((2, 6), 5, 5, 0.18, 0),
]


def test_requests_loading_their_prefix_under_priority_preemption_all_finish() -> None:
    sched = make_scheduler(
        "priority",
        **{
            "policies.priority.preempt": True,
            "scheduler.preemption_mode": "swap",  # preempted prefixes load back from cpu
            "kv.block_size": 2,
            "kv.device.num_blocks": 11,
            "kv.cpu.num_blocks": 64,
            "scheduler.max_num_batched_tokens": 10,
            "scheduler.max_num_seqs": 4,
        },
    )
    requests = [
        make_request(
            [100 * group + t for t in range(shared)] + [1000 + 10 * i + t for t in range(own)],
            max_new_tokens,
            arrival,
            f"q{i}",
            priority=priority,
        )
        for i, ((group, shared), own, max_new_tokens, arrival, priority) in enumerate(
            LOADS_AND_PRIORITIES
        )
    ]
    runner, now, states = ScriptedRunner(), 0.0, []
    for _ in range(1000):
        while requests and requests[0].arrival_time <= now:
            states.append(sched.add(requests.pop(0)))
        if not sched.has_unfinished and not requests:
            break
        plan = sched.plan(now)
        if plan.is_empty:  # nothing runnable: on to the next copy landing or arrival
            due = [t for t in (sched.next_event_time(), now + 0.01) if t is not None]
            now = max(now, min(due + [r.arrival_time for r in requests[:1]]))
            continue
        result = runner.execute(plan)
        now += result.duration_s
        sched.commit(plan, result, now)
        sched.check_integrity()
    else:
        raise AssertionError("not finished after 1000 steps")
    assert sched.stats.num_preemptions > 0 and sched.stats.hit_tokens_by_tier["cpu"] > 0
    assert all(s.finish_reason is FinishReason.LENGTH for s in states)
    sched.store.drain(now)  # the last swaps out land
    assert sched.num_leaked_blocks() == 0


def test_stop_token_finishes_a_request() -> None:
    sched = make_scheduler()
    from kvflow.request import SamplingParams

    state = sched.add(
        make_request(8, max_new_tokens=50, sampling=SamplingParams(stop_token_ids=(7,)))
    )
    run_to_completion(sched, ScriptedRunner(token=7))
    assert state.finish_reason is FinishReason.STOP
    assert state.output_token_ids == [7]


def test_commit_rejects_a_result_of_the_wrong_length() -> None:
    sched = make_scheduler()
    sched.add(make_request(8))
    plan = sched.plan(0.0)
    with pytest.raises(ValueError, match="1 scheduled requests"):
        sched.commit(plan, StepResult([1, 2]), 0.1)


def test_duplicate_request_ids_are_refused() -> None:
    sched = make_scheduler()
    sched.add(make_request(8, request_id="x"))
    with pytest.raises(ValueError, match="'x' is already queued"):
        sched.add(make_request(8, request_id="x"))


def test_max_num_seqs_caps_running_requests() -> None:
    sched = make_scheduler(**{"scheduler.max_num_seqs": 3})
    for i in range(10):
        sched.add(make_request(8, max_new_tokens=3, base=50 * i))
    plans = run_to_completion(sched)
    assert max(len(p.requests) for p in plans) == 3


class PositionalRunner(ScriptedRunner):
    """Samples a token that depends on the request and the position, so any mix-up of
    positions between pipelined steps changes the output."""

    def execute(self, plan: StepPlan) -> StepResult:
        sampled: list[int | None] = []
        for i, req in enumerate(plan.requests):
            end = plan.start_positions[i] + plan.num_tokens[i]
            ok = plan.samples(i) and req.status is RequestStatus.RUNNING
            sampled.append((sum(req.token_ids[-3:]) * 31 + end) % 1000 if ok else None)
        return StepResult(sampled, 0.01)


def test_pipelined_planning_gives_the_same_tokens_as_step_by_step() -> None:
    def run(pipelined: bool) -> dict[str, list[int]]:
        sched = make_scheduler(
            **{"kv.block_size": 4, "kv.device.num_blocks": 64,
               "scheduler.max_num_batched_tokens": 24, "scheduler.long_prefill_threshold": 6,
               "scheduler.max_num_seqs": 4}
        )  # fmt: skip
        states = [
            sched.add(make_request(10 + 3 * i, 5 + i, base=100 * i, request_id=f"p{i}"))
            for i in range(6)
        ]
        runner = PositionalRunner()
        now = 0.0
        plan = sched.plan(now)
        for _ in range(500):
            if plan.is_empty and not sched.has_unfinished:
                break
            # Step N executes; step N+1 is planned meanwhile (before N's commit).
            nxt = sched.plan(now, overlapped=True) if pipelined else None
            result = runner.execute(plan)
            now += result.duration_s
            sched.commit(plan, result, now)
            sched.check_integrity()
            plan = nxt if nxt is not None and not nxt.is_empty else sched.plan(now)
        assert not sched.has_unfinished and sched.num_leaked_blocks() == 0
        return {s.request_id: s.output_token_ids for s in states}

    step_by_step = run(False)
    assert run(True) == step_by_step
    assert all(len(v) == 5 + i for i, v in enumerate(step_by_step.values()))


def test_an_overlapped_plan_never_preempts_and_says_when_it_left_a_request_out() -> None:
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 4})
    a = sched.add(make_request(8, max_new_tokens=4, base=100, request_id="a"))
    b = sched.add(make_request(7, max_new_tokens=4, base=500, request_id="b"))
    runner = ScriptedRunner()
    first = sched.plan(0.0)  # both prompts: all 4 blocks
    assert first.requests == [a, b] and sched.pool.num_free_blocks == 0
    sched.commit(first, runner.execute(first), 0.01)
    # a's next token starts a new block; none is free and an overlapped plan may not
    # preempt, so a waits and b (whose block has room) runs.
    second = sched.plan(0.01, overlapped=True)
    assert second.requests == [b] and not second.preempted_ids
    assert sched.last_plan_short_of_blocks and sched.stats.num_preemptions == 0
    sched.commit(second, runner.execute(second), 0.02)
    sched.check_integrity()
    third = sched.plan(0.02)  # made after the commit: it may preempt
    assert third.preempted_ids == ["b"] and a in third.requests
    assert not sched.last_plan_short_of_blocks
    sched.check_integrity()


def test_a_match_started_from_another_chain_is_revalidated() -> None:
    # A request's first match starts from the latest match of a chain with the same
    # first block: what it copies must still be cached, and it must stop where the two
    # chains part.
    sched = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    system = list(range(8))  # two shared blocks
    a = sched.add(make_request(system + [50] * 8 + [1], max_new_tokens=1, request_id="a"))
    run_to_completion(sched)
    assert a.is_finished

    b = sched.add(make_request(system + [60] * 8 + [1], max_new_tokens=1, request_id="b"))
    assert sched.locate(b).device_tokens == 8  # the system prompt, not a's own blocks
    c = sched.add(make_request(system + [50] * 8 + [2], max_new_tokens=1, request_id="c"))
    assert sched.locate(c).device_tokens == 16  # b's two blocks, then a's next two

    sched.pool.reset_prefix_cache()  # every cached key leaves the pool
    d = sched.add(make_request(system + [50] * 8 + [3], max_new_tokens=1, request_id="d"))
    assert sched.locate(d).device_tokens == 0
    run_to_completion(sched)
    assert b.num_cached_tokens == 0  # admitted first, when nothing was cached
    assert all(r.is_finished for r in (b, c, d))
    sched.check_integrity()


def test_block_keys_handed_to_add_are_adopted_and_grow_as_hashing_would() -> None:
    settings = {"kv.block_size": 4, "kv.device.num_blocks": 64}
    prompt = list(range(500, 510))  # two full blocks and a partial one
    hashed = make_scheduler(**settings)
    own = hashed.add(make_request(prompt, max_new_tokens=7, request_id="a"))
    keys = list(own.block_keys)
    assert len(keys) == 2
    given = make_scheduler(**settings)
    handed = list(keys)
    state = given.add(make_request(prompt, max_new_tokens=7, request_id="a"), block_keys=handed)
    assert state.block_keys is handed  # adopted, not copied
    run_to_completion(hashed)
    run_to_completion(given)
    # Decoding filled blocks 2 and 3: the adopted list took their keys, as hashing gave them.
    assert len(own.block_keys) == 4
    assert handed == own.block_keys
    # A tuple is copied: the caller's sequence is never the request's.
    third = make_scheduler(**settings)
    frozen = tuple(keys)
    copied = third.add(make_request(prompt, max_new_tokens=1, request_id="b"), block_keys=frozen)
    assert copied.block_keys == keys and type(copied.block_keys) is list


@pytest.mark.parametrize("mode", ["auto", "swap"])
def test_with_no_cpu_tier_a_preempted_request_is_recomputed(mode: str) -> None:
    sched = make_scheduler(
        **{
            "kv.block_size": 4,
            "kv.device.num_blocks": 12,
            "kv.recompute_token_us": 1000.0,  # swapping would be cheaper, had it a tier
            "scheduler.preemption_mode": mode,
        }
    )
    states = [sched.add(make_request(10, max_new_tokens=20, base=100 * i)) for i in range(5)]
    run_to_completion(sched)
    assert sched.stats.num_preemptions > 0 and sched.stats.num_swaps == 0
    assert all(s.num_output_tokens == 20 for s in states)
