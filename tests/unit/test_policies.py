"""Built-in policies order hand-built queues as their specifications say."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import pytest

import kvflow.policies
from kvflow.kv.location import PrefixLocation
from kvflow.policies import SchedulerView, UnknownNameError
from kvflow.policies.base import Policy
from kvflow.policies.edf import EDFPolicy
from kvflow.policies.fair import FairPolicy
from kvflow.policies.fcfs import FCFSPolicy
from kvflow.policies.lpm import LPMPolicy
from kvflow.policies.priority import PriorityPolicy
from kvflow.request import SLO, Request, RequestState
from kvflow.scheduler.plan import StepPlan

BLOCK_SIZE = 16


def make_state(
    request_id: str,
    *,
    num_prompt_tokens: int = 32,
    arrival_time: float = 0.0,
    priority: int = 0,
    tenant: str = "default",
    ttft_ms: float | None = None,
) -> RequestState:
    return RequestState(
        Request(
            request_id=request_id,
            prompt_token_ids=tuple(range(num_prompt_tokens)),
            max_new_tokens=8,
            arrival_time=arrival_time,
            priority=priority,
            tenant=tenant,
            slo=SLO(ttft_ms=ttft_ms),
        )
    )


def make_view(
    now: float = 0.0,
    cached: Mapping[str, PrefixLocation] | None = None,
    *,
    num_waiting: int = 0,
) -> tuple[SchedulerView, list[str]]:
    """A real SchedulerView whose cache is scripted: request_id -> PrefixLocation.

    Also returns the ids `locate` was asked about, to check lookups stay bounded.
    """
    table = dict(cached or {})
    asked: list[str] = []

    def locate(state: RequestState) -> PrefixLocation:
        asked.append(state.request_id)
        return table.get(state.request_id, PrefixLocation())

    view = SchedulerView(block_size=BLOCK_SIZE, max_num_seqs=8, locate=locate)
    view._begin_step(now=now, num_free_blocks=100, num_running=0, num_waiting=num_waiting)
    return view, asked


def ids(requests: Iterable[RequestState]) -> list[str]:
    return [r.request_id for r in requests]


def make_plan(entries: list[tuple[RequestState, int]]) -> StepPlan:
    """A plan computing `n` tokens of each request, as if from position 0."""
    num_tokens = [n for _, n in entries]
    return StepPlan(
        step_id=0,
        now=0.0,
        requests=[r for r, _ in entries],
        num_tokens=num_tokens,
        start_positions=[0] * len(entries),
        num_prefill_tokens=sum(n for n in num_tokens if n > 1),
        num_decode_tokens=sum(1 for n in num_tokens if n == 1),
        num_kv_tokens=sum(num_tokens),
    )


# --- registry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fcfs", FCFSPolicy),
        ("lpm", LPMPolicy),
        ("edf", EDFPolicy),
        ("priority", PriorityPolicy),
        ("fair", FairPolicy),
    ],
)
def test_create_builds_every_builtin(name: str, cls: type[Policy]) -> None:
    policy = kvflow.policies.create(name)
    assert type(policy) is cls
    assert policy.name == name
    assert name in kvflow.policies.names()


def test_create_passes_options() -> None:
    policy = kvflow.policies.create("lpm", candidate_window=4, max_wait_s=1.5)
    assert isinstance(policy, LPMPolicy)
    assert (policy.candidate_window, policy.max_wait_s) == (4, 1.5)


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        kvflow.policies.create("no-such-policy")
    message = str(info.value)
    assert "no-such-policy" in message
    assert "fcfs" in message
    assert "fair" in message


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lpm", {"candidate_window": 0}),
        ("lpm", {"max_wait_s": 0.0}),
        ("edf", {"hopeless": "ignore"}),
        ("edf", {"prefill_token_s": -1.0}),
        ("fair", {"output_weight": -2.0}),
    ],
)
def test_bad_options_are_rejected_with_the_value(name: str, options: dict[str, object]) -> None:
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        kvflow.policies.create(name, **options)


# --- fcfs -------------------------------------------------------------------------


def test_fcfs_keeps_queue_order() -> None:
    waiting = [make_state(f"r{i}", arrival_time=float(9 - i)) for i in range(5)]
    view, _ = make_view(now=10.0)
    assert ids(FCFSPolicy().order(waiting, view)) == ["r0", "r1", "r2", "r3", "r4"]


# --- lpm --------------------------------------------------------------------------


def test_lpm_ranks_by_cached_prefix_with_stable_ties() -> None:
    waiting = [make_state(f"r{i}", num_prompt_tokens=128) for i in range(5)]
    cached = {
        "r1": PrefixLocation(device_tokens=32),
        "r2": PrefixLocation(device_tokens=16, cpu_tokens=48),  # 64 over two tiers
        "r3": PrefixLocation(disk_tokens=32),
        "r4": PrefixLocation(peer_tokens=16, peer="peer-a"),
    }
    view, _ = make_view(now=0.1, cached=cached)
    assert ids(LPMPolicy().order(waiting, view)) == ["r2", "r1", "r3", "r4", "r0"]


def test_lpm_ranks_only_the_candidate_window() -> None:
    waiting = [make_state(f"r{i}") for i in range(6)]
    cached = {"r1": PrefixLocation(device_tokens=16), "r4": PrefixLocation(device_tokens=512)}
    view, asked = make_view(now=0.1, cached=cached)
    order = ids(LPMPolicy(candidate_window=3).order(waiting, view))
    # r4's big hit is outside the window: it keeps its queue place.
    assert order == ["r1", "r0", "r2", "r3", "r4", "r5"]
    assert set(asked) <= {"r0", "r1", "r2"}


def test_lpm_puts_an_aged_miss_ahead_of_cache_hits() -> None:
    waiting = [
        make_state("hit-new", arrival_time=9.0),
        make_state("miss-old", arrival_time=4.0),
        make_state("miss-older", arrival_time=3.0),
        make_state("miss-new", arrival_time=9.5),
    ]
    cached = {"hit-new": PrefixLocation(device_tokens=32)}
    view, _ = make_view(now=9.9, cached=cached)
    order = ids(LPMPolicy(max_wait_s=5.0).order(waiting, view))
    # Aged requests go first in queue order (not arrival order), then the hit.
    assert order == ["miss-old", "miss-older", "hit-new", "miss-new"]

    # Aging starts exactly at max_wait_s.
    at_bound, _ = make_view(now=8.0, cached=cached)
    order = ids(LPMPolicy(max_wait_s=5.0).order(waiting, at_bound))
    assert order == ["miss-older", "hit-new", "miss-old", "miss-new"]
    just_under, _ = make_view(now=7.99, cached=cached)
    assert ids(LPMPolicy(max_wait_s=5.0).order(waiting, just_under))[0] == "hit-new"


# --- edf --------------------------------------------------------------------------


def test_edf_orders_by_deadline_and_puts_no_deadline_last() -> None:
    waiting = [
        make_state("none-a"),
        make_state("late", ttft_ms=3000),
        make_state("soon", arrival_time=1.0, ttft_ms=500),  # due at 1.5
        make_state("none-b"),
        make_state("mid", ttft_ms=2000),
    ]
    view, _ = make_view(now=0.0)
    assert ids(EDFPolicy(hopeless="keep").order(waiting, view)) == [
        "soon",
        "mid",
        "late",
        "none-a",
        "none-b",
    ]


def test_edf_uses_an_explicit_deadline_over_the_slo() -> None:
    explicit = RequestState(
        Request("explicit", prompt_token_ids=(1, 2), max_new_tokens=1, deadline=0.2)
    )
    waiting = [make_state("slo", ttft_ms=100), explicit]
    view, _ = make_view(now=0.0)
    assert ids(EDFPolicy().order(waiting, view)) == ["slo", "explicit"]


def hopeless_queue() -> tuple[list[RequestState], SchedulerView]:
    """At now=1.0 with 1 ms per token: 'doomed' needs 0.5 s (nothing cached) but has
    0.3 s left; 'saved' has 0.3 s left too, but 400 of its 500 tokens are cached;
    'past' is already late; 'relaxed' has plenty of slack."""
    waiting = [
        make_state("relaxed", num_prompt_tokens=500, ttft_ms=5000),
        make_state("doomed", num_prompt_tokens=500, ttft_ms=1300),
        make_state("saved", num_prompt_tokens=500, ttft_ms=1300),
        make_state("past", num_prompt_tokens=10, ttft_ms=900),
        make_state("no-deadline"),
    ]
    view, _ = make_view(now=1.0, cached={"saved": PrefixLocation(device_tokens=400)})
    return waiting, view


def test_edf_keep_ignores_slack() -> None:
    waiting, view = hopeless_queue()
    policy = EDFPolicy(hopeless="keep", prefill_token_s=1e-3)
    assert ids(policy.order(waiting, view)) == ["past", "doomed", "saved", "relaxed", "no-deadline"]
    assert list(policy.drop(waiting, view)) == []


def test_edf_deprioritizes_hopeless_requests() -> None:
    waiting, view = hopeless_queue()
    policy = EDFPolicy(hopeless="deprioritize", prefill_token_s=1e-3)
    # Feasible by deadline, then hopeless by deadline, then no deadline.
    assert ids(policy.order(waiting, view)) == ["saved", "relaxed", "past", "doomed", "no-deadline"]
    assert list(policy.drop(waiting, view)) == []


def test_edf_rejects_hopeless_requests_with_a_reason() -> None:
    waiting, view = hopeless_queue()
    policy = EDFPolicy(hopeless="reject", prefill_token_s=1e-3)
    dropped = {r.request_id: reason for r, reason in policy.drop(waiting, view)}
    assert sorted(dropped) == ["doomed", "past"]
    assert "1.300000" in dropped["doomed"]  # the deadline
    assert "0.500000" in dropped["doomed"]  # the estimate: 500 tokens at 1 ms
    assert "deadline" in dropped["past"]


def test_edf_never_calls_a_started_request_hopeless() -> None:
    started = make_state("started", ttft_ms=100)
    started.first_token_time = 0.05  # produced its first token, then was preempted
    waiting = [make_state("fresh", ttft_ms=5000), started]
    view, _ = make_view(now=2.0)
    policy = EDFPolicy(hopeless="reject")
    assert list(policy.drop(waiting, view)) == []
    assert ids(EDFPolicy(hopeless="deprioritize").order(waiting, view)) == ["started", "fresh"]


def test_edf_skips_cache_lookups_when_slack_is_obvious() -> None:
    waiting = [make_state(f"r{i}", num_prompt_tokens=100, ttft_ms=10_000) for i in range(4)]
    view, asked = make_view(now=0.0)
    list(EDFPolicy(prefill_token_s=1e-3).order(waiting, view))
    assert asked == []


def test_edf_victim_has_the_latest_deadline() -> None:
    running = [
        make_state("a", ttft_ms=1000),
        make_state("b", ttft_ms=9000),
        make_state("c", ttft_ms=2000),
    ]
    view, _ = make_view()
    assert EDFPolicy().victim(running, view).request_id == "b"
    no_deadline = [*running[:1], make_state("none"), *running[1:]]
    assert EDFPolicy().victim(no_deadline, view).request_id == "none"
    tied = [*running, make_state("b-later", ttft_ms=9000)]
    assert EDFPolicy().victim(tied, view).request_id == "b-later"  # last admitted


# --- priority ---------------------------------------------------------------------


def test_priority_orders_by_priority_then_queue_position() -> None:
    waiting = [
        make_state("p2-a", priority=2),
        make_state("p0-a", priority=0),
        make_state("p1", priority=1),
        make_state("p0-b", priority=0),
        make_state("p2-b", priority=2),
        make_state("neg", priority=-1),
    ]
    view, _ = make_view()
    assert ids(PriorityPolicy().order(waiting, view)) == [
        "neg",
        "p0-a",
        "p0-b",
        "p1",
        "p2-a",
        "p2-b",
    ]


def test_priority_victim_is_least_important_then_last_admitted() -> None:
    running = [
        make_state("p3-first", priority=3),
        make_state("p1", priority=1),
        make_state("p3-last", priority=3),
        make_state("p0", priority=0),
    ]
    view, _ = make_view()
    assert PriorityPolicy().victim(running, view).request_id == "p3-last"


def test_priority_preempt_for_only_when_enabled_and_strictly_less_important() -> None:
    running = [make_state("p1", priority=1), make_state("p2", priority=2)]
    view, _ = make_view()
    urgent = make_state("urgent", priority=0)
    assert PriorityPolicy(preempt=False).preempt_for(urgent, running, view) is None
    chosen = PriorityPolicy(preempt=True).preempt_for(urgent, running, view)
    assert chosen is not None and chosen.request_id == "p2"
    peer = make_state("peer", priority=2)
    assert PriorityPolicy(preempt=True).preempt_for(peer, running, view) is None
    assert PriorityPolicy(preempt=True).preempt_for(urgent, [], view) is None


# --- fair -------------------------------------------------------------------------


def add_all(policy: Policy, requests: Iterable[RequestState], view: SchedulerView) -> None:
    for req in requests:
        policy.on_add(req, view)


def test_fair_interleaves_tenants_when_one_floods_the_queue() -> None:
    flood = [make_state(f"a{i}", tenant="a") for i in range(6)]
    late = [make_state(f"b{i}", tenant="b") for i in range(2)]
    waiting = [*flood, *late]
    view, _ = make_view()
    policy = FairPolicy()
    add_all(policy, waiting, view)
    order = ids(policy.order(waiting, view))
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]
    assert policy.counters == {"a": 0.0, "b": 0.0}  # order charges nothing


def test_fair_prefers_the_tenant_with_less_service() -> None:
    waiting = [make_state("a0", tenant="a"), make_state("b0", tenant="b")]
    view, _ = make_view()
    policy = FairPolicy(input_weight=1.0, output_weight=2.0)
    add_all(policy, waiting, view)
    running_a = make_state("a-run", tenant="a")
    policy.on_add(running_a, view)
    policy.on_step(make_plan([(running_a, 32), (running_a, 1)]), view)
    assert policy.counter("a") == 32 * 1.0 + 1 * 2.0
    assert ids(policy.order(waiting, view)) == ["b0", "a0"]


def test_fair_order_stops_charging_what_it_does_not_yield() -> None:
    waiting = [make_state(f"a{i}", tenant="a") for i in range(3)] + [make_state("b0", tenant="b")]
    view, _ = make_view()
    policy = FairPolicy()
    add_all(policy, waiting, view)
    first = next(iter(policy.order(waiting, view)))
    assert first.request_id == "a0"
    assert policy.counters == {"a": 0.0, "b": 0.0}
    # A fresh call starts from the real counters, not from the abandoned estimates.
    assert ids(policy.order(waiting, view))[:2] == ["a0", "b0"]


def test_fair_lifts_an_idle_tenant_to_the_active_minimum() -> None:
    view, _ = make_view()
    policy = FairPolicy(input_weight=1.0)
    a0, b0 = make_state("a0", tenant="a"), make_state("b0", tenant="b")
    add_all(policy, [a0, b0], view)
    policy.on_step(make_plan([(a0, 100), (b0, 40)]), view)
    # Tenant c arrives late: it starts at the smallest active counter, not at 0.
    c0 = make_state("c0", tenant="c")
    policy.on_add(c0, view)
    assert policy.counter("c") == 40.0
    # b goes idle and comes back: it may not keep credit banked while idle.
    policy.on_finish(b0, view)
    policy.on_step(make_plan([(a0, 100), (c0, 200)]), view)
    policy.on_add(make_state("b1", tenant="b"), view)
    assert policy.counter("b") == 200.0  # min(a=200, c=240)
    # A tenant that is already active is not lifted.
    policy.on_add(make_state("c1", tenant="c"), view)
    assert policy.counter("c") == 240.0


def test_fair_lift_without_active_tenants_uses_the_last_to_leave() -> None:
    view, _ = make_view()
    policy = FairPolicy()
    a0 = make_state("a0", tenant="a")
    policy.on_add(a0, view)
    policy.on_step(make_plan([(a0, 50)]), view)
    policy.on_finish(a0, view)
    policy.on_finish(a0, view)  # a second finish is ignored
    assert policy.num_active == {}
    policy.on_add(make_state("b0", tenant="b"), view)
    assert policy.counter("b") == 50.0


def test_fair_victim_comes_from_the_heaviest_tenant() -> None:
    view, _ = make_view()
    policy = FairPolicy()
    a0, a1 = make_state("a0", tenant="a"), make_state("a1", tenant="a")
    b0, b1 = make_state("b0", tenant="b"), make_state("b1", tenant="b")
    add_all(policy, [a0, b0, a1, b1], view)
    policy.on_step(make_plan([(a0, 300), (b0, 100)]), view)
    assert policy.victim([a0, b0, a1, b1], view).request_id == "a1"
    policy.on_step(make_plan([(b0, 500)]), view)
    assert policy.victim([a0, b0, a1, b1], view).request_id == "b1"


def test_lpm_weighs_a_cpu_hit_below_an_equal_device_hit() -> None:
    from kvflow.policies.lpm import LPMPolicy

    on_device = _tiered_state("dev", 0.0)
    in_cpu = _tiered_state("cpu", 0.0)
    on_disk = _tiered_state("disk", 0.0)
    bigger_on_disk = _tiered_state("disk-big", 0.0)
    locations = {
        "dev": PrefixLocation(device_tokens=64),
        "cpu": PrefixLocation(device_tokens=16, cpu_tokens=48),
        "disk": PrefixLocation(disk_tokens=64),
        "disk-big": PrefixLocation(disk_tokens=160),
    }
    view = SchedulerView(16, 8, lambda r: locations[r.request_id])
    view._begin_step(0.0, 100, 0, 4)
    order = list(LPMPolicy().order([on_disk, in_cpu, bigger_on_disk, on_device], view))
    assert [r.request_id for r in order] == ["disk-big", "dev", "cpu", "disk"]


def _tiered_state(rid: str, arrival: float) -> RequestState:
    return RequestState(Request(rid, tuple(range(200)), 4, arrival_time=arrival))
