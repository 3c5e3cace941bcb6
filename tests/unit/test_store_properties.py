"""Property: random requests, aborts and tiny tier capacities through scheduler + tiered
store keep both consistent after every step and leak nothing, in virtual time and with
real copies."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvflow.config import KVFlowConfig
from kvflow.kv.store import BlockEvent, KVStore
from kvflow.policies import make_policy
from kvflow.request import FinishReason, RequestStatus
from kvflow.scheduler import Scheduler
from tests.builders import ScriptedRunner, make_request
from tests.guarantee_settings import store_knobs

LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4, "dtype": "float32"}

request_st = st.tuples(
    st.integers(0, 40),  # arrival step
    st.integers(6, 24),  # prompt length
    st.integers(1, 8),  # max new tokens
    st.integers(0, 2),  # shared-prefix group
)

knobs = st.fixed_dictionaries(store_knobs(device=(8, 11), cpu_max=12, disk_max=20, budget_max=32))


def drive(
    requests: list[tuple[int, int, int, int]],
    aborts: dict[int, int],
    settings_: dict[str, object],
    real: bool,
) -> None:
    settings_ = dict(settings_)
    if settings_["kv.cpu.num_blocks"] == 0:
        settings_["kv.disk.num_blocks"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            **settings_, "kv.block_size": 4, "kv.layout": LAYOUT, "kv.disk.path": f"{tmp}/slab",
            # A cheap copy model and dear recompute, so loads and swaps happen.
            "kv.recompute_token_us": 1000.0,
        }  # fmt: skip
        config = KVFlowConfig.from_dict({}, overrides)
        store = KVStore.with_tensors(config.kv) if real else KVStore(config.kv)
        try:
            _drive(config, store, requests, aborts)
        finally:
            store.close()


def _drive(
    config: KVFlowConfig,
    store: KVStore,
    requests: list[tuple[int, int, int, int]],
    aborts: dict[int, int],
) -> None:
    sched = Scheduler(config, make_policy("fcfs", config), store)
    runner = ScriptedRunner(step_s=0.01)
    # What a peer learns from the store's block events: replayed, always its index.
    held: dict[str, set[int]] = {"device": set(), "cpu": set(), "disk": set()}

    def on_event(e: BlockEvent) -> None:
        keys = set(e.keys)
        if e.kind == "stored":
            assert keys.isdisjoint(held[e.tier]), f"{e.tier}: stored twice {keys}"
            held[e.tier] |= keys
        else:
            assert keys <= held[e.tier], f"{e.tier}: dropped unheld {keys - held[e.tier]}"
            held[e.tier] -= keys

    store.add_listener(on_event)
    pools = {"device": store.device, "cpu": store.cpu, "disk": store.disk}
    states = {}
    now = 0.0
    for step in range(3000):
        for i, (arrive, plen, out, group) in enumerate(requests):
            if arrive == step:
                prompt = [9000 + 100 * group + k for k in range(min(plen, 16))]
                prompt += [i * 1000 + k for k in range(plen - len(prompt))]
                req = make_request(prompt, out, arrival=now, request_id=f"q{i}")
                states[req.request_id] = sched.add(req, now)
        for idx, at_step in aborts.items():
            if at_step == step and idx < len(requests):
                sched.abort(f"q{idx}", now)
        if step > 30 and not sched.has_unfinished:
            break
        if sched.has_unfinished:
            plan = sched.plan(now)
            if plan.is_empty:
                t_next = sched.next_event_time()
                if t_next is not None:
                    now = max(now, t_next)
                else:
                    store.wait(0.5)
            else:
                result = runner.execute(plan)
                now += result.duration_s
                sched.commit(plan, result, now)
        sched.check_integrity()
        for tier, pool in pools.items():
            assert held[tier] == (set(pool._cached) if pool is not None else set()), tier
    else:
        raise AssertionError("did not finish")
    store.drain(now)
    sched.check_integrity()
    assert sched.num_leaked_blocks() == 0 and store.device.num_used_blocks == 0
    for pool in (store.cpu, store.disk):
        assert pool is None or pool.num_used_blocks == 0  # nothing pinned after the drain
    for state in states.values():
        assert state.status is RequestStatus.FINISHED and not state.block_ids
        if state.finish_reason is FinishReason.LENGTH:
            assert state.num_output_tokens == state.max_new_tokens
    stats = sched.stats
    below = stats.hit_tokens_by_tier["cpu"] + stats.hit_tokens_by_tier["disk"]
    event(f"below-device hits={below > 0}")
    event(f"preempted={stats.num_preemptions > 0}")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=4, max_size=14),
    aborts=st.dictionaries(st.integers(0, 11), st.integers(0, 12), max_size=4),
    settings_=knobs,
)
def test_tiers_stay_consistent_in_virtual_time(
    requests: list[tuple[int, int, int, int]], aborts: dict[int, int], settings_: dict[str, object]
) -> None:
    drive(requests, aborts, settings_, real=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=2, max_size=10),
    aborts=st.dictionaries(st.integers(0, 9), st.integers(0, 12), max_size=3),
    settings_=knobs,
)
def test_tiers_stay_consistent_with_real_copies(
    requests: list[tuple[int, int, int, int]], aborts: dict[int, int], settings_: dict[str, object]
) -> None:
    drive(requests, aborts, settings_, real=True)
