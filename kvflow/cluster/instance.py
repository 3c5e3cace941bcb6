"""One simulated instance of a fleet: a scheduler, its store and a simulated runner,
stepping on its own clock inside the fleet's event loop."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.simulated import SimulatedRunner
from kvflow.kv.block_pool import BlockPool, KeyListener
from kvflow.kv.store import TierName
from kvflow.policies.base import Policy
from kvflow.request import Request, RequestState, RequestStatus
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult

_FINISHED = RequestStatus.FINISHED
_RUNNING = RequestStatus.RUNNING
_WAITING_FOR_KV = RequestStatus.WAITING_FOR_KV


class Phase(enum.Enum):
    IDLE = "idle"
    """Nothing to do until a request arrives."""
    WAITING = "waiting"
    """Planned nothing; the next plan is due at `next_plan_time` (a copy lands)."""
    STALLED = "stalled"
    """Holds requests but could schedule nothing, with no copy due: only an arrival
    can unblock it."""
    BUSY = "busy"
    """A step is executing; its commit is due."""


class SimInstance:
    """An instance of the fleet simulation.

    Args:
        index: its number in the fleet.
        config: its configuration (instances may differ).
        policy: its own policy object (policies keep per-instance state).
        listeners: receive its store's block changes, per tier (the fleet's index:
            `KVStore.add_key_listeners`).
    """

    def __init__(
        self,
        index: int,
        config: KVFlowConfig,
        policy: Policy,
        listeners: Mapping[TierName, KeyListener],
    ) -> None:
        self.index = index
        self.config = config
        self.scheduler = Scheduler(config, policy)
        self.store = self.scheduler.store
        self.device = self.store.device
        self.block_size = self.store.block_size
        self.runner = SimulatedRunner.from_config(config.sim)
        self.latency = self.runner.latency
        self.store.add_key_listeners(listeners)
        kv = config.kv
        self.capacity = kv.tier_blocks("device") + kv.tier_blocks("cpu") + kv.tier_blocks("disk")
        """Blocks it can cache, over all tiers."""
        self.states: list[RequestState] = []
        self.phase = Phase.IDLE
        self.next_plan_time = 0.0
        self.plan_version = 0
        """Bumped when a pending plan event is superseded (stale ones are skipped)."""
        self.clock = 0.0
        """Virtual time of its latest event."""
        self.step: tuple[StepPlan, StepResult] | None = None
        self.expected_cached: dict[str, int] = {}
        """Prompt tokens each unfinished request was expected to find cached when routed."""
        self.dirty = True
        """Its state changed since the fleet last counted its load (it is in the fleet's
        list of changed instances)."""
        self.prefilling: dict[str, RequestState] = {}
        """Requests that may still have prompt tokens to prefill (pruned as they finish
        their prefill, added again when preempted)."""

    @property
    def landing_pool(self) -> BlockPool:
        """Where blocks pulled from a peer land: the cpu tier, else the device tier."""
        return self.store.cpu if self.store.cpu is not None else self.store.device

    def add(
        self, request: Request, now: float, block_keys: list[int] | None = None
    ) -> RequestState:
        """Queue a request; `block_keys` are its prompt's keys when the fleet hashed
        them for this instance's block size already."""
        state = self.scheduler.add(request, now, block_keys=block_keys)
        self.states.append(state)
        if state.finish_reason is None:
            self.prefilling[state.request_id] = state
        return state

    def on_preempted(self, request_ids: list[str]) -> None:
        """Preempted requests prefill again when readmitted."""
        waiting = self.scheduler.waiting
        for rid in request_ids:
            state = waiting.get(rid)
            if state is not None:
                self.prefilling[rid] = state

    def num_queued_tokens(self) -> int:
        """Prefill tokens still to compute: each waiting request's tokens less those it
        was expected to find cached, and each running request's rest of its prefill."""
        total = 0
        waiting = self.scheduler.waiting
        if waiting:
            expected = self.expected_cached
            for rid, state in waiting.items():
                uncached = len(state.token_ids) - expected.get(rid, 0)
                if uncached > 0:
                    total += uncached
        prefilling = self.prefilling
        done: list[str] = []
        for rid, state in prefilling.items():
            status = state.status
            if status is _FINISHED:
                done.append(rid)
            elif status is _RUNNING or status is _WAITING_FOR_KV:
                computed = state.num_computed_tokens
                if computed >= state.num_prompt_tokens:
                    done.append(rid)
                    continue
                rest = len(state.token_ids) - computed
                if rest > 1:
                    total += rest
        for rid in done:
            del prefilling[rid]
        return total

    def land(self, keys: list[int]) -> int:
        """Index pulled blocks (in chain order) as cached blocks of the landing tier, as
        many as it has room for. Returns how many landed."""
        pool = self.landing_pool
        new_keys = pool.uncached(keys)
        n = min(len(new_keys), pool.num_free_blocks)
        if n == 0:
            return 0
        blocks = pool.allocate(n)
        pool.seal_many(blocks, new_keys[:n])
        pool.release(blocks)
        return n
