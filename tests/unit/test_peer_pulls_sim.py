"""Pulls from peers in the scheduler's load path, in virtual time: a request whose
prefix run a peer holds waits in WAITING_FOR_KV for latency + bytes / peer_gbps, then
runs from after the pulled blocks; a pull that lands short is recomputed from the first
missing block; recomputing wins when the cost model says so."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow import policies
from kvflow.config import KVFlowConfig
from kvflow.kv.store import KVStore
from kvflow.kv.transfer import CopyEngine, SimCopyEngine, Transfer
from kvflow.peer.directory import Directory
from kvflow.peer.frames import KeyRecord, SeqFrame
from kvflow.request import Request, RequestState, RequestStatus
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult
from tests.builders import make_config

INC = b"a" * 16
PROMPT = list(range(1, 10))  # two full blocks of 4, then the token the step computes


def setup(**settings: object) -> tuple[KVFlowConfig, KVStore, Scheduler]:
    base: dict[str, object] = {
        "kv.block_size": 4,
        "kv.device.num_blocks": 8,
        "kv.cpu.num_blocks": 8,
        "kv.load_policy": "always",
    }
    base.update(settings)
    config = make_config(**base)
    store = KVStore(config.kv)
    return config, store, Scheduler(config, policies.create("fcfs"), store)


def peer_holds(directory: Directory, keys: list[int]) -> None:
    record = KeyRecord("stored", "cpu", np.array(keys, dtype=np.uint64))
    directory.apply_resync("A", SeqFrame(INC, 0, (record,)), 0.0)


def run_until_scheduled(scheduler: Scheduler, req: RequestState) -> StepPlan:
    """Plan at each copy's completion time until the request runs (bounded)."""
    now = 0.0
    for _ in range(20):
        plan = scheduler.plan(now)
        if req.request_id in [r.request_id for r in plan.requests]:
            return plan
        t_next = scheduler.next_event_time()
        assert t_next is not None, f"{req.request_id} waits for nothing: {req.status}"
        now = t_next
    raise AssertionError(f"{req.request_id} never ran")


def test_a_prefix_held_by_a_peer_is_pulled_then_promoted() -> None:
    config, store, scheduler = setup()
    req = scheduler.add(Request("b", PROMPT, max_new_tokens=1), 0.0)
    directory = Directory(heartbeat_timeout_s=5)
    peer_holds(directory, req.block_keys[:2])
    store.remote = directory

    assert scheduler.plan(0.0).is_empty
    assert req.status is RequestStatus.WAITING_FOR_KV
    nbytes = 2 * store.bytes_per_block
    transfer = config.kv.transfer
    pull_s = transfer.peer_latency_us * 1e-6 + nbytes / (transfer.peer_gbps * 1e9)
    assert scheduler.next_event_time() == pytest.approx(pull_s)

    plan = run_until_scheduled(scheduler, req)
    assert plan.start_positions == [8] and plan.num_tokens == [1]  # no prefill of them
    assert req.num_cached_tokens == 8
    assert req.kv_wait_s > pull_s  # the pull, then the promotion to device
    assert scheduler.stats.hit_tokens_by_tier == {"device": 0, "cpu": 0, "disk": 0, "peer": 8}
    assert store.stats.bytes_moved["peer_to_cpu"] == nbytes
    assert store.stats.bytes_moved["cpu_to_device"] == nbytes
    assert store.stats.num_pulls == 1 and store.stats.num_failed_pulls == 0
    for pool in (store.cpu, store.device):  # pulled, then promoted: their chain's depths
        assert pool is not None
        depths = [int(pool.depths[pool._cached[key]]) for key in req.block_keys[:2]]
        assert depths == [0, 1]
    scheduler.commit(plan, StepResult([7]), 1.0)
    store.drain(1.0)
    scheduler.check_integrity()
    assert store.device.num_used_blocks == 0


def test_recomputing_wins_when_the_network_is_slower() -> None:
    _, store, scheduler = setup(
        **{"kv.load_policy": "auto", "kv.transfer.peer_latency_us": 1e6}  # one second
    )
    req = scheduler.add(Request("b", PROMPT, max_new_tokens=1), 0.0)
    directory = Directory(heartbeat_timeout_s=5)
    peer_holds(directory, req.block_keys[:2])
    store.remote = directory
    assert store.locate(req.block_keys[:2]).peer_tokens == 8  # known, yet not pulled
    plan = scheduler.plan(0.0)
    assert plan.start_positions == [0] and plan.num_tokens == [9]
    assert store.stats.num_pulls == 0
    assert scheduler.stats.hit_tokens_by_tier["peer"] == 0


class ShortPulls(SimCopyEngine):
    """A modelled network whose pulls land only their first `num_landing` blocks (what a
    stale hint or a bad checksum does): a fleet's own engine behind the seam."""

    def __init__(self, store: KVStore, num_landing: int) -> None:
        super().__init__(store.config.transfer)
        self.num_landing = num_landing

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        return [
            (t, [i < self.num_landing for i in range(len(ok))]) for t, ok in super().completed(now)
        ]


class ModelledFleet(Directory):
    def __init__(self, engine: CopyEngine) -> None:
        super().__init__(heartbeat_timeout_s=5)
        self.engine = engine

    @property
    def pull_engine(self) -> CopyEngine | None:
        return self.engine


@pytest.mark.parametrize("num_landing", [0, 1])
def test_a_pull_that_lands_short_is_recomputed_from_the_first_missing_block(
    num_landing: int,
) -> None:
    _, store, scheduler = setup()
    req = scheduler.add(Request("b", PROMPT, max_new_tokens=1), 0.0)
    fleet = ModelledFleet(ShortPulls(store, num_landing))
    peer_holds(fleet, req.block_keys[:2])
    store.remote = fleet

    assert scheduler.plan(0.0).is_empty
    plan = run_until_scheduled(scheduler, req)
    start = 4 * num_landing
    assert plan.start_positions == [start] and plan.num_tokens == [9 - start]
    assert req.num_cached_tokens == start
    assert scheduler.stats.hit_tokens_by_tier["peer"] == start
    assert store.stats.num_failed_pulls == 1
    assert store.stats.bytes_moved["peer_to_cpu"] == num_landing * store.bytes_per_block
    scheduler.commit(plan, StepResult([7]), 1.0)
    store.drain(1.0)
    scheduler.check_integrity()
    assert store.device.num_used_blocks == 0
    assert store.cpu is not None and store.cpu.num_used_blocks == 0
