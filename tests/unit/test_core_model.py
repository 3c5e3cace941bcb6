"""Model-based test of the core: scheduler + tiered store (real tensors, a real slab
file) + simulated peers, driven by random arrivals, aborts, cancellations mid-step,
tier pressure, preemption, peer loss and disk faults (a hypothesis state machine).

After every rule: every component's `check_integrity()` (refcounts and free lists add
up, every reference held by a request, a copy or an export), every request is in
exactly one state, and no request of a policy with a starvation bound (fcfs: none is
ever passed over; lpm: none once it waited `max_wait_s`) is passed over by one behind
it. Every step, a shadow runner checks that each KV position a request attends holds
that request's own token's KV, and the copy engine that no copy's source or destination
was written while the copy ran (`tests.kv_shadow`); a peer's view of an exported run is
checked alike. At the end: every request finished, aborted or rejected, each output
exactly what its prompt determines, and zero referenced blocks in every tier.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvflow.kv.export import HeldRun, RunReader, pin_run, unpin
from kvflow.kv.storage import DiskStorage, TensorStorage
from kvflow.kv.store import KVStore
from kvflow.peer.directory import Directory
from kvflow.peer.frames import KeyRecord, SeqFrame
from kvflow.policies import make_policy
from kvflow.request import FinishReason, Request, RequestState, RequestStatus, SamplingParams
from kvflow.scheduler import Scheduler, StepPlan
from tests.guarantee_settings import examples, store_knobs
from tests.kv_shadow import (
    ShadowCopies,
    ShadowRunner,
    SimPeer,
    corrupt_disk_block,
    expected_output,
    prefix_values,
    shadow_config,
    truncate_slab,
)

STEP_S = 0.01
BOUNDED = ("fcfs", "lpm")
"""Policies with a starvation bound the machine checks."""

arrival = st.tuples(
    st.integers(0, 1),  # prefix group
    st.integers(0, 4),  # blocks shared with the group
    st.integers(1, 6),  # tokens of its own
    st.integers(1, 6),  # max new tokens
    st.integers(0, 2),  # priority
    st.sampled_from(["a", "b"]),  # tenant
    st.none() | st.integers(1, 97),  # a stop token
)
knobs = st.fixed_dictionaries(
    {
        "kv.block_size": st.sampled_from([2, 4]),
        **store_knobs(device=(6, 12), cpu_max=10, disk_max=12, budget_max=24),
        "scheduler.enable_inbatch_prefix_sharing": st.booleans(),
        "policies.lpm.candidate_window": st.integers(1, 3),
        "policies.lpm.max_wait_s": st.sampled_from([0.02, 0.05]),
        "policies.priority.preempt": st.booleans(),
    }
)


class CoreMachine(RuleBasedStateMachine):
    """One scheduler over one store with real tensors, stepped as the engine steps it."""

    num_runs = 0
    """Examples run (machines built), for the report."""
    num_steps = 0
    """Scheduler steps executed over all examples."""

    def __init__(self) -> None:
        super().__init__()
        self.store: KVStore | None = None
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.healthy = True

    @initialize(
        settings_=knobs,
        policy=st.sampled_from(["fcfs", "lpm", "edf", "priority", "fair"]),
        overlap=st.booleans(),
        num_peers=st.integers(0, 2),
    )
    def build(self, settings_: dict[str, Any], policy: str, overlap: bool, num_peers: int) -> None:
        self.healthy = False
        self.tmp = tempfile.TemporaryDirectory()
        config = shadow_config(settings_, self.tmp.name)
        kv = config.kv
        num_cpu, num_disk = kv.tier_blocks("cpu"), kv.tier_blocks("disk")
        device = TensorStorage.allocate(kv, kv.tier_blocks("device"), "cpu")
        cpu = TensorStorage.allocate(kv, num_cpu, "cpu") if num_cpu else None
        disk = DiskStorage.create(kv, num_disk) if num_cpu and num_disk else None
        self.peers = {f"p{i}": SimPeer(f"p{i}") for i in range(num_peers if cpu else 0)}
        self.copies = ShadowCopies(kv, device, cpu, disk, self.peers.get)
        self.store = store = KVStore(
            kv, self.copies, device_storage=device, cpu_storage=cpu, disk_storage=disk
        )
        self.directory = Directory(heartbeat_timeout_s=1e9)
        self.peer_seq = dict.fromkeys(self.peers, 0)
        if self.peers:
            store.remote = self.directory
        self.config = config
        self.policy = policy
        self.sched = Scheduler(config, make_policy(policy, config), store)
        self.runner = ShadowRunner(store, overlap=overlap, step_s=STEP_S)
        self.overlap = overlap
        self.bs = kv.block_size
        self.check_starvation = policy in BOUNDED and not (
            config.scheduler.enable_inbatch_prefix_sharing
        )
        self.max_wait_s = config.policies.lpm.max_wait_s if policy == "lpm" else 0.0
        self.now = 0.0
        self.pending: StepPlan | None = None
        self.states: list[RequestState] = []
        self.exports: list[HeldRun] = []
        self.reader = RunReader(store)
        self.num_stalls = 0
        self.healthy = True
        CoreMachine.num_runs += 1
        event(f"policy={policy}, overlap={overlap}, peers={len(self.peers)}")

    # -- stepping, as AsyncEngine does ---------------------------------------------------
    def plan(self, overlapped: bool) -> StepPlan:
        sched = self.sched
        queue = list(sched.waiting.values())
        plan = sched.plan(self.now, overlapped=overlapped)
        if self.check_starvation:
            self.check_nobody_passed_over(queue, plan.now)
        return plan

    def check_nobody_passed_over(self, queue: list[RequestState], now: float) -> None:
        """A request left waiting that has waited its policy's bound (fcfs: none) has no
        request behind it in the queue admitted in this plan."""
        admitted = [
            r.status in (RequestStatus.RUNNING, RequestStatus.WAITING_FOR_KV) for r in queue
        ]
        for i, req in enumerate(queue):
            if req.request_id in self.sched.waiting and now - req.arrival_time >= self.max_wait_s:
                passed = [
                    r.request_id
                    for r, a in zip(queue[i + 1 :], admitted[i + 1 :], strict=True)
                    if a
                ]
                assert not passed, (
                    f"{self.policy}: {req.request_id} (waited {now - req.arrival_time:.3f} s) "
                    f"passed over by {passed}"
                )

    def one_step(self, cancel: int | None = None, cancel_after_execute: bool = False) -> None:
        sched = self.sched
        store = self.store
        assert store is not None
        plan, self.pending = self.pending, None
        if plan is None:
            if not sched.has_unfinished:
                t_next = sched.next_event_time()
                if t_next is not None:  # copies land while idle
                    self.now = max(self.now, t_next)
                    sched.reap_copies(self.now)
                return
            plan = self.plan(overlapped=False)
            if plan.is_empty:
                t_next = sched.next_event_time()
                if t_next is None:
                    self.num_stalls += 1  # only export pins may hold what it waits for
                    self.now += STEP_S
                else:
                    self.now = max(self.now, t_next)
                return
        next_plan = None
        if self.overlap and not sched.last_plan_short_of_blocks:
            next_plan = self.plan(overlapped=True)
        victim = plan.requests[cancel % len(plan.requests)] if cancel is not None else None
        if victim is not None and not cancel_after_execute:
            sched.abort(victim.request_id, self.now, defer_release=True)
        result = self.runner.execute(plan)
        CoreMachine.num_steps += 1
        if victim is not None and cancel_after_execute:
            sched.abort(victim.request_id, self.now, defer_release=True)
        self.now += result.duration_s
        sched.release_deferred(self.now)
        sched.commit(plan, result, self.now)
        if next_plan is not None and not next_plan.is_empty:
            self.pending = next_plan

    # -- rules ---------------------------------------------------------------------------
    @rule(arrivals=st.lists(arrival, min_size=1, max_size=4))
    def arrive(self, arrivals: list[tuple[int, int, int, int, int, str, int | None]]) -> None:
        """A burst of requests; those of a group share its leading blocks."""
        for group, num_shared, suffix, max_new, priority, tenant, stop in arrivals:
            i = len(self.states)
            prompt = [1000 + 100 * group + k for k in range(num_shared * self.bs)]
            prompt += [20_000 + 100 * i + k for k in range(suffix)]
            sampling = SamplingParams(stop_token_ids=(stop,) if stop is not None else ())
            request = Request(
                f"q{i}",
                prompt,
                max_new,
                arrival_time=self.now,
                priority=priority,
                tenant=tenant,
                sampling=sampling,
            )
            state = self.sched.add(request, self.now)
            self.states.append(state)
            if state.finish_reason is FinishReason.REJECTED:
                event("rejected at arrival")

    @rule(cancel=st.none() | st.integers(0, 7), after=st.booleans())
    def step(self, cancel: int | None, after: bool) -> None:
        """One step; `cancel` aborts one of its requests while it runs (its blocks are
        released after the step)."""
        self.one_step(cancel, after)

    @rule(n=st.integers(2, 8))
    def steps(self, n: int) -> None:
        for _ in range(n):
            self.one_step()

    @precondition(lambda self: self.sched.has_unfinished)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        active = [s for s in self.states if not s.is_finished]
        victim = data.draw(st.sampled_from(active), label="victim")
        assert self.sched.abort(victim.request_id, self.now) is victim
        assert victim.finish_reason is FinishReason.ABORTED and not victim.block_ids

    # -- peers -------------------------------------------------------------------------
    def publish(self, peer: SimPeer) -> None:
        """The peer's snapshot reaches the directory (a resync)."""
        self.peer_seq[peer.name] += 1
        keys = np.array(sorted(peer.keys), dtype=np.uint64)
        record = KeyRecord("stored", "cpu", keys)
        frame = SeqFrame(peer.incarnation, self.peer_seq[peer.name], (record,))
        self.directory.apply_resync(peer.name, frame, self.now)

    @precondition(lambda self: self.peers and self.states)
    @rule(data=st.data())
    def peer_caches(self, data: st.DataObject) -> None:
        """A peer served some request's prompt: it holds its leading full blocks."""
        peer = self.peers[data.draw(st.sampled_from(sorted(self.peers)), label="peer")]
        state = data.draw(st.sampled_from(self.states), label="request")
        keys = state.block_keys[: state.num_prompt_tokens // self.bs]
        prompt = tuple(state.request.prompt_token_ids)
        for i, key in enumerate(keys):
            peer.keys[key] = prompt[: (i + 1) * self.bs]
        if peer.up:
            self.publish(peer)

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def peer_forgets(self, data: st.DataObject) -> None:
        """A peer drops its blocks without telling: the directory's hints go stale."""
        peer = self.peers[data.draw(st.sampled_from(sorted(self.peers)), label="peer")]
        peer.keys.clear()

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), warm=st.booleans())
    def peer_lost_or_back(self, data: st.DataObject, warm: bool) -> None:
        """A peer dies (pulls in flight from it land nothing), or comes back: restarted
        empty (a new incarnation) or warm (its blocks kept)."""
        peer = self.peers[data.draw(st.sampled_from(sorted(self.peers)), label="peer")]
        if peer.up:
            peer.up = False
            self.directory.mark_down(peer.name)
            return
        peer.up = True
        if not warm:
            peer.keys.clear()
            peer.incarnation = bytes([len(self.states) % 256]) * 16
        self.publish(peer)

    # -- disk faults ---------------------------------------------------------------------
    @precondition(lambda self: self.store is not None and self.store.disk_storage is not None)
    @rule(data=st.data())
    def corrupt_disk_block(self, data: st.DataObject) -> None:
        assert self.store is not None and self.store.disk_storage is not None
        disk = self.store.disk_storage
        held = sorted(self.store.disk._cached.values()) if self.store.disk is not None else []
        slots = st.sampled_from(held) if held else st.integers(0, disk.num_blocks - 1)
        corrupt_disk_block(disk, data.draw(slots, label="slot"))  # mostly a block it holds

    @precondition(lambda self: self.store is not None and self.store.disk_storage is not None)
    @rule()
    def truncate_slab(self) -> None:
        assert self.store is not None and self.store.disk_storage is not None
        truncate_slab(self.store.disk_storage)

    # -- exports to peers ----------------------------------------------------------------
    @precondition(lambda self: self.states)
    @rule(data=st.data())
    def export_run(self, data: st.DataObject) -> None:
        """A peer pulls a request's blocks from this store: the run is pinned, and its
        bytes are that request's KV."""
        assert self.store is not None
        state = data.draw(st.sampled_from(self.states), label="request")
        run = pin_run(self.store, state.block_keys)
        if not len(run):
            unpin(self.store, run)
            return
        self.exports.append(run)
        by_key = {k: i for i, k in enumerate(state.block_keys)}
        got = self.reader.read_run(run)
        shape = (1, 2, self.bs, 1, 2)  # LAYOUT: one layer, K and V, one head, two dims
        tokens = list(state.token_ids)
        for key, view in zip(run.keys, got.views, strict=False):
            end = (by_key[key] + 1) * self.bs
            values = prefix_values(tokens[:end])[-self.bs :]
            block = np.frombuffer(view, dtype=np.float64).reshape(shape)
            assert list(block[0, 0, :, 0, 0]) == values, f"exported block {key} is not its KV"
        event("exported a run")

    @precondition(lambda self: self.exports)
    @rule()
    def export_ends(self) -> None:
        assert self.store is not None
        unpin(self.store, self.exports.pop(0))

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if self.store is None:
            return
        self.healthy = False
        sched = self.sched
        sched.check_integrity()
        for pool in (self.store.device, self.store.cpu, self.store.disk):
            if pool is not None:
                assert pool.num_used_blocks + pool.num_free_blocks == pool.num_blocks
        # Every request in exactly one state, and in the queue of that state.
        where = {
            RequestStatus.WAITING: sched.waiting,
            RequestStatus.PREEMPTED: sched.waiting,
            RequestStatus.WAITING_FOR_KV: sched.loading,
            RequestStatus.RUNNING: {r.request_id: r for r in sched.running},
        }
        for state in self.states:
            places = [
                name
                for name, queue in (
                    ("waiting", sched.waiting),
                    ("loading", sched.loading),
                    ("running", {r.request_id: r for r in sched.running}),
                )
                if queue.get(state.request_id) is state
            ]
            if state.status is RequestStatus.FINISHED:
                assert not places, f"{state.request_id} finished, yet in {places}"
                assert not state.block_ids
                assert state.finish_reason is not None
            else:
                assert len(places) == 1, f"{state.request_id} ({state.status.name}) in {places}"
                assert where[state.status].get(state.request_id) is state
        assert sched.num_unfinished == sum(not s.is_finished for s in self.states)
        self.healthy = True

    def teardown(self) -> None:
        try:
            if self.store is not None and self.healthy:
                self.finish()
        finally:
            if self.store is not None:
                self.store.close()
            if self.tmp is not None:
                self.tmp.cleanup()

    def finish(self) -> None:
        """Run to the end: everything finishes, outputs are what the prompts determine,
        and no block is referenced anywhere."""
        store = self.store
        assert store is not None
        while self.exports:
            unpin(store, self.exports.pop())
        stalls = self.num_stalls
        for _ in range(5000):
            if not self.sched.has_unfinished and self.pending is None:
                break
            self.one_step()
            self.consistent()
        else:
            raise AssertionError("not finished after 5000 steps")
        assert self.num_stalls == stalls, "stalled with no export pins held"
        store.drain(self.now)
        self.sched.check_integrity()
        assert self.sched.num_leaked_blocks() == 0
        for tier, pool in (("device", store.device), ("cpu", store.cpu), ("disk", store.disk)):
            assert pool is None or pool.num_used_blocks == 0, f"{tier} blocks still referenced"
        reasons = {FinishReason.LENGTH, FinishReason.STOP, FinishReason.ABORTED}
        for state in self.states:
            assert state.status is RequestStatus.FINISHED
            if state.finish_reason is FinishReason.REJECTED:
                continue
            assert state.finish_reason in reasons
            want = expected_output(state.request)
            got = state.output_token_ids
            if state.finish_reason is FinishReason.ABORTED:
                assert got == want[: len(got)], f"{state.request_id}: {got} not a prefix of {want}"
            else:
                assert got == want, f"{state.request_id}: {got}, want {want}"
        stats = self.sched.stats
        event(f"preempted={stats.num_preemptions > 0}")
        below = stats.hit_tokens_by_tier["cpu"] + stats.hit_tokens_by_tier["disk"]
        event(f"hits below device={below > 0}")
        event(f"peer hits={stats.hit_tokens_by_tier['peer'] > 0}")
        event(f"failed copies={self.copies.num_failed_blocks > 0}")


NUM_EXAMPLES = 1000
NUM_EXAMPLES_SLOW = 14_000
STEPS = 25


def run(num_examples: int, slow: bool) -> None:
    CoreMachine.num_runs = CoreMachine.num_steps = 0
    settings_ = examples(num_examples, slow=slow, stateful_step_count=STEPS)
    run_state_machine_as_test(CoreMachine, settings=settings_)
    assert CoreMachine.num_runs >= num_examples
    print(f"core model: {CoreMachine.num_runs} examples, {CoreMachine.num_steps} steps")


def test_core_model() -> None:
    run(NUM_EXAMPLES, slow=False)


@pytest.mark.slow
def test_core_model_slow() -> None:
    run(NUM_EXAMPLES_SLOW, slow=True)
