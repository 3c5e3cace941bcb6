"""The fleet's discrete-event loop (`FleetLoop`): arrivals routed, pulls and handoffs
over the modelled network, each instance planning and committing on its own clock.

Events are ordered by (time, kind, seq): at one moment, steps end (commit) first,
then requests arrive and are routed (the router sees the fleet as it is then), then
pulled prefixes land, then instances plan their next step, as the single-instance
replay orders them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

from kvflow.cluster.index import BlockIndex
from kvflow.cluster.instance import Phase, SimInstance
from kvflow.cluster.pd import Handoff, decode_request, merge_halves, prefill_request
from kvflow.cluster.results import FleetStalledError, InstanceResult, Pull
from kvflow.cluster.routers import LeastLoadedRouter, Router
from kvflow.cluster.view import FleetView, PeerNetwork
from kvflow.config import KVFlowConfig
from kvflow.kv.capacity import check_fleet_bookkeeping
from kvflow.policies.base import Policy
from kvflow.request import FinishReason, Request, RequestState

_COMMIT, _ARRIVE, _LAND, _PLAN = range(4)
# Enum members bound once: in Python 3.11 reading `Phase.BUSY` goes through
# `EnumType.__getattr__` (~1k instructions), and the loop reads them at every step.
_IDLE, _WAITING, _STALLED, _BUSY = Phase.IDLE, Phase.WAITING, Phase.STALLED, Phase.BUSY


def _network(configs: Sequence[KVFlowConfig]) -> PeerNetwork:
    first = configs[0].kv
    for i, config in enumerate(configs):
        kv = config.kv
        if kv.block_size != first.block_size or kv.layout != first.layout:
            raise ValueError(
                f"peers need equal blocks on every instance: instance {i} has "
                f"kv.block_size={kv.block_size!r} and kv.layout={kv.layout.model_dump()!r}, "
                f"instance 0 has {first.block_size!r} and {first.layout.model_dump()!r}"
            )
    return PeerNetwork(
        first.transfer.peer_gbps, first.transfer.peer_latency_us, first.bytes_per_block()
    )


class FleetLoop:
    def __init__(
        self,
        configs: Sequence[KVFlowConfig],
        policies: Sequence[Policy],
        router: Router,
        peers: bool,
        check_integrity: bool,
        pd: tuple[int, int] | None = None,
    ) -> None:
        if not configs:
            raise ValueError("a fleet needs at least one instance")
        if len(configs) != len(policies):
            raise ValueError(f"{len(configs)} instance configs but {len(policies)} policies")
        n = len(configs)
        check_fleet_bookkeeping([c.kv for c in configs])  # before any instance's pools
        if pd is not None and (pd[0] < 1 or pd[1] < 1 or pd[0] + pd[1] != n):
            raise ValueError(
                f"pd={pd[0]}:{pd[1]} needs at least one prefill and one decode instance "
                f"and P + D = the {n} instances"
            )
        # The router routes over the prefill instances alone (all of them without pd);
        # decode instances form their own view, routed by load.
        num_routed = pd[0] if pd is not None else n
        groups = [range(num_routed)] + ([range(num_routed, n)] if pd is not None else [])
        indexes = [BlockIndex(len(g)) for g in groups]
        self.local = [0] * n
        """Each instance's number within its view."""
        group_of = [0] * n
        for g, members in enumerate(groups):
            for k, i in enumerate(members):
                self.local[i], group_of[i] = k, g
        self.instances = [
            SimInstance(i, c, p, indexes[group_of[i]].key_listeners(self.local[i]))
            for i, (c, p) in enumerate(zip(configs, policies, strict=True))
        ]
        network = _network(configs) if peers or pd is not None else None
        self.views = [
            FleetView(
                [self.instances[i].latency for i in members],
                [self.instances[i].capacity for i in members],
                indexes[g],
                configs[0].kv.block_size,
                network if peers and g == 0 else None,
            )
            for g, members in enumerate(groups)
        ]
        self.view = self.views[0]
        for g, members in enumerate(groups):
            self.views[g].device_blocks[:] = [self.instances[i].device.num_blocks for i in members]
        self.changed = [[self.instances[i] for i in members] for members in groups]
        """Per view: its instances whose state changed since their loads were last
        counted (`dirty`); a view is brought up to date only when it is read."""
        self.changed_of = [self.changed[group_of[i]] for i in range(n)]
        self.pd = pd
        self.handoff_network = network if pd is not None else None
        self.decode_router = LeastLoadedRouter()
        self.originals: dict[str, Request] = {}
        """With pd: the requests whose prefill runs as a one-token copy, by id."""
        self.handoffs: list[Handoff] = []
        self.router = router
        self.check_integrity = check_integrity
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.pulls: list[Pull] = []
        self.routed = [0] * n
        self.sum_max_load = 0.0
        self.sum_mean_load = 0.0
        self.num_held = [0] * n
        self.num_routed_instances = num_routed
        self.sum_max_held = 0.0
        self.sum_mean_held = 0.0
        self.next_arrival_time = math.inf

    # -- the loop ----------------------------------------------------------------------
    def run(self, pending: list[Request]) -> float:
        heap = self.heap
        pop = heapq.heappop
        i, n = 0, len(pending)
        now = pending[0].arrival_time if pending else 0.0
        t_arrival = now if n else math.inf
        self.next_arrival_time = t_arrival
        while True:
            if heap:
                top = heap[0]
                t = top[0]
                if t < t_arrival or (t == t_arrival and top[1] < _ARRIVE):
                    now, kind, _, payload = pop(heap)
                    if kind == _COMMIT:
                        self._commit(payload, now)
                    elif kind == _PLAN:
                        inst, version = payload
                        if version == inst.plan_version:
                            self._plan(inst, now)
                    else:
                        inst, request, landed, expected_cached, keys = payload
                        inst.land(landed)
                        self._deliver(inst, request, now, expected_cached, keys)
                    continue
            if i == n:
                break
            now = t_arrival
            self._arrive(pending[i], now)
            i += 1
            t_arrival = pending[i].arrival_time if i < n else math.inf
            self.next_arrival_time = t_arrival
        stalled = [inst for inst in self.instances if inst.scheduler.has_unfinished]
        if stalled:
            inst = stalled[0]
            raise FleetStalledError(
                f"at t={now:.6f}s instance {inst.index} holds "
                f"{inst.scheduler.num_unfinished} requests but scheduled nothing, and no "
                "arrival or copy is due"
            )
        return now

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), payload))

    # -- arrivals --------------------------------------------------------------------
    def _arrive(self, request: Request, now: float) -> None:
        view = self.view
        view.advance(now)
        self._refresh_loads(0)
        queued = view.num_queued_tokens
        self.sum_max_load += max(queued)
        self.sum_mean_load += sum(queued) / len(queued)
        held = self.num_held if self.pd is None else self.num_held[: self.num_routed_instances]
        self.sum_max_held += max(held)
        self.sum_mean_held += sum(held) / len(held)
        target = self.router.route(request, view)
        if not 0 <= target < view.num_instances:
            raise ValueError(
                f"router {self.router.name!r} chose instance {target!r} for "
                f"{request.request_id!r}; the fleet has 0..{view.num_instances - 1}"
            )
        self.routed[target] += 1
        view.num_routed[target] += 1
        inst = self.instances[target]
        runs = view.cached_blocks(request)
        keys = view.take_block_keys(request)
        if self.pd is not None and request.max_new_tokens > 1:
            # Prefill computes the first token only; the rest is decoded after handoff.
            self.originals[request.request_id] = request
            request = prefill_request(request)
        if view.network is not None and self._try_pull(inst, request, now, keys, runs):
            return
        expected_cached = runs[target] * view.block_size
        self._deliver(inst, request, now, expected_cached, keys)

    def _try_pull(
        self, inst: SimInstance, request: Request, now: float, keys: list[int], runs: list[int]
    ) -> bool:
        """Start pulling the prefix a peer holds beyond what `inst` holds (`runs`: the
        leading blocks each instance holds), when faster than prefilling it. Returns
        whether a pull started (the request waits for it)."""
        view = self.view
        network = view.network
        assert network is not None
        best = max(runs)
        local = runs[inst.index]
        if best <= local:
            return False
        source = self.instances[runs.index(best)]
        # The owner re-validates: the index is advisory, its store is the truth.
        held = source.store.locate(keys[:best]).local_tokens // view.block_size
        num_blocks = held - local
        if num_blocks <= 0:
            return False
        pull_s = network.pull_time_s(num_blocks)
        bs = view.block_size
        if pull_s >= num_blocks * bs * inst.latency.prefill_token_us * 1e-6:
            return False
        pull = Pull(
            request.request_id,
            source.index,
            inst.index,
            local * bs,
            num_blocks * bs,
            num_blocks * network.bytes_per_block,
            now,
            now + pull_s,
        )
        self.pulls.append(pull)
        self._push(pull.end, _LAND, (inst, request, keys[local:held], held * bs, keys))
        return True

    def _deliver(
        self,
        inst: SimInstance,
        request: Request,
        now: float,
        expected_cached: int,
        keys: list[int] | None,
    ) -> None:
        """Add `request` to `inst`; `keys` are its prompt's block keys (all or a leading
        part: a decode half's are its prefill's) at the fleet's block size, when known."""
        inst.expected_cached[request.request_id] = expected_cached
        if not inst.dirty:
            inst.dirty = True
            self.changed_of[inst.index].append(inst)
        if inst.block_size != self.view.block_size:
            keys = None
        state = inst.add(request, now, keys)
        if state.finish_reason is not None:  # rejected at once
            del inst.expected_cached[request.request_id]
            return
        if inst.phase is _BUSY:
            return  # it plans when its step ends
        if inst.phase is _WAITING and inst.next_plan_time <= now:
            return
        self._schedule_plan(inst, now)

    def _refresh_loads(self, group: int) -> None:
        """Bring view `group`'s loads up to date for its instances that changed since."""
        view = self.views[group]
        queued, running, used = view.num_queued_tokens, view.num_running, view.num_used_blocks
        num_held, local = self.num_held, self.local
        changed = self.changed[group]
        for inst in changed:
            inst.dirty = False
            i = inst.index
            k = local[i]
            queued[k] = inst.num_queued_tokens()
            scheduler = inst.scheduler
            running[k] = len(scheduler.running) + len(scheduler.loading)
            used[k] = inst.device.num_used_blocks
            num_held[i] = scheduler.num_unfinished
        changed.clear()

    # -- disaggregation ---------------------------------------------------------------
    def _hand_off(self, inst: SimInstance, state: RequestState, now: float) -> None:
        """Send a prefilled request's prompt blocks to the least loaded decode instance;
        it continues there once they land. The prefill instance has freed it (its
        blocks stay cached there, evictable)."""
        original = self.originals.get(state.request_id)
        if original is None or state.finish_reason is not FinishReason.LENGTH:
            return  # nothing more to generate (or it never produced its first token)
        network = self.handoff_network
        assert network is not None
        self._refresh_loads(1)
        decode_view = self.views[1]
        target = self.instances[
            self.num_routed_instances + self.decode_router.route(original, decode_view)
        ]
        decode_view.num_routed[self.local[target.index]] += 1
        self.routed[target.index] += 1
        bs = inst.block_size
        num_blocks = state.num_prompt_tokens // bs
        keys = state.block_keys[:num_blocks]
        end = now + network.pull_time_s(num_blocks)
        self.handoffs.append(
            Handoff(
                state.request_id,
                inst.index,
                target.index,
                num_blocks * bs,
                num_blocks * network.bytes_per_block,
                now,
                end,
            )
        )
        request = decode_request(original, state, end)
        self._push(end, _LAND, (target, request, keys, num_blocks * bs, keys))

    def merged_states(self, results: Sequence[InstanceResult]) -> list[RequestState]:
        k = self.num_routed_instances
        return merge_halves(
            [st for r in results[:k] for st in r.states],
            [st for r in results[k:] for st in r.states],
            self.originals,
        )

    # -- instances -------------------------------------------------------------------
    def _schedule_plan(self, inst: SimInstance, t: float) -> None:
        inst.plan_version += 1
        inst.phase = _WAITING
        inst.next_plan_time = t
        self._push(t, _PLAN, (inst, inst.plan_version))

    def _plan(self, inst: SimInstance, now: float) -> None:
        scheduler = inst.scheduler
        inst.clock = now
        if not inst.dirty:
            inst.dirty = True
            self.changed_of[inst.index].append(inst)
        if not (scheduler.waiting or scheduler.running or scheduler.loading):
            inst.phase = _IDLE  # nothing unfinished (`has_unfinished`, inlined: every step)
            return
        plan = scheduler.plan(now)
        if plan.preempted_ids:
            inst.on_preempted(plan.preempted_ids)
        if not plan.requests:
            t_copy = scheduler.next_event_time()
            if t_copy is not None:
                self._schedule_plan(inst, max(now, t_copy))
            elif scheduler.has_unfinished:
                inst.phase = _STALLED
            else:  # the policy dropped the rest
                inst.phase = _IDLE
            return
        result = inst.runner.execute(plan)
        inst.step = (plan, result)
        inst.phase = _BUSY
        heapq.heappush(self.heap, (now + result.duration_s, _COMMIT, next(self.seq), inst))

    def _commit(self, inst: SimInstance, now: float) -> None:
        step = inst.step
        assert step is not None
        inst.step = None
        inst.clock = now
        finished = inst.scheduler.commit(step[0], step[1], now)
        if finished:
            expected = inst.expected_cached
            hand_off = self.originals and inst.index < self.num_routed_instances
            for state in finished:
                expected.pop(state.request_id, None)
                if hand_off:
                    self._hand_off(inst, state, now)
        if self.check_integrity:
            inst.scheduler.check_integrity()
        heap = self.heap
        if now < self.next_arrival_time and not (heap and heap[0][0] <= now and heap[0][1] < _PLAN):
            self._plan(inst, now)  # nothing due before its plan: skip the event
        else:
            if not inst.dirty:
                inst.dirty = True
                self.changed_of[inst.index].append(inst)
            self._schedule_plan(inst, now)

    def finish(self, inst: SimInstance) -> InstanceResult:
        scheduler = inst.scheduler
        scheduler.store.drain(inst.clock)
        if self.check_integrity:
            scheduler.check_integrity()
        return InstanceResult(
            index=inst.index,
            states=inst.states,
            stats=scheduler.stats,
            store_stats=scheduler.store.stats,
            num_leaked_blocks=scheduler.num_leaked_blocks(),
            end_time=inst.clock,
            landing_tier="cpu" if scheduler.store.cpu is not None else "device",
            role=""
            if self.pd is None
            else ("prefill" if inst.index < self.num_routed_instances else "decode"),
        )
