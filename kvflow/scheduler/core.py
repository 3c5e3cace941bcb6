"""The step planner: synchronous, deterministic, no clock and no awaits.

`plan(now)` decides the next step: running requests first (one token per decode, the
next chunk for a prefill), then waiting requests in the policy's order while budget,
slots and blocks remain. It allocates device blocks and advances each scheduled
request's `num_computed_tokens`. `commit(plan, result, now)` applies the runner's
sampled tokens: appends them, seals full blocks into the prefix cache, and finishes
requests. Time only comes in as an argument, so the same code drives a real engine
and a virtual-time replay.

Helpers the `Scheduler` owns: `queues.RequestQueues` (its requests by state, and the
changes of state: finish, preemption), `admission.Admission` (waiting requests into the
step), `commit.Committer` (a step's results applied), `kv_manager.KVManager` (cache
lookups, the requests' blocks: allocated, sealed, freed), `loads.Loads` (requests
waiting for copies from lower tiers), `batch.Batch` (the plan being built); `integrity`
holds the checks of its invariants.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.config import KVFlowConfig
from kvflow.kv.location import PrefixLocation
from kvflow.kv.store import KVStore
from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import FinishReason, Request, RequestState, RequestStatus
from kvflow.scheduler import integrity
from kvflow.scheduler.admission import Admission
from kvflow.scheduler.batch import Batch
from kvflow.scheduler.commit import Committer
from kvflow.scheduler.kv_manager import KVManager
from kvflow.scheduler.loads import Loads
from kvflow.scheduler.plan import ModelInfo, StepPlan
from kvflow.scheduler.queues import RequestQueues
from kvflow.scheduler.stats import SchedulerStats

# Bound once: read per request per step (see `kvflow.scheduler.queues`).
_RUNNING = RequestStatus.RUNNING


class Scheduler:
    """Plans steps for one model instance over one KV store.

    Args:
        config: the whole configuration; `scheduler` and `kv` sections are used here.
        policy: decides admission order and preemption victims.
        store: the KV store; built from `config.kv` when omitted.
        model: what the runner's model allows (vocabulary, positions) and its
            end-of-sequence tokens; nothing by default (the simulated runner's case).
    """

    def __init__(
        self,
        config: KVFlowConfig,
        policy: Policy,
        store: KVStore | None = None,
        *,
        model: ModelInfo | None = None,
    ) -> None:
        self.config = config
        self.model = model if model is not None else ModelInfo()
        self.sched_config = config.scheduler
        self.store = store if store is not None else KVStore(config.kv)
        self.block_size = self.store.block_size
        self.policy = policy
        """Decides admission order and preemption victims (fixed once built: the
        queues and admission hold it too)."""
        self.stats = SchedulerStats()
        self.kv_manager = kv = KVManager(self.store, self.sched_config, self.stats)
        self.pool = kv.pool
        """The device pool: the one `kv_manager` drives (`store.device`), the same
        object under a short name for callers and the per-step reads of its free count."""
        self._loads = Loads(self.store, self.stats)
        self.last_plan_short_of_blocks = False
        """The last plan left a running request out for want of blocks (it could not
        preempt: it was planned while a step ran)."""
        self.view = SchedulerView(self.block_size, self.sched_config.max_num_seqs, kv.locate)
        self.queues = queues = RequestQueues(kv, self._loads, policy, self.view, self.stats)
        self.waiting = queues.waiting
        """Requests waiting for admission, in order (preempted ones at the front)."""
        self.running = queues.running
        self.loading = queues.loading
        """Admitted requests in WAITING_FOR_KV: their prefix is being copied to device."""
        self._admission = Admission(queues, kv, policy, self.sched_config)
        self._eos_token_ids = frozenset(self.model.eos_token_ids)
        self.commit = Committer(queues, kv, self._eos_token_ids).commit
        """Apply a step's results (`Committer.commit`: append the sampled tokens, seal the
        blocks they filled, finish requests at their length or a stop token); returns
        the requests that finished in this step. The committer's own method, bound once:
        a method here calling it would cost a call per step (~0.1% of a tiered replay's
        instructions)."""
        self._preempt = queues.preempt
        self._finish = queues.finish
        self._policy_drops = policy.drops_requests()
        self._policy_on_step = type(policy).on_step is not Policy.on_step
        self._policy_preempts = type(policy).preempt_for is not Policy.preempt_for
        # The knobs read at every step, as plain attributes: a pydantic model's field is
        # read through its `__getattr__` hook, several times the cost (the config is
        # frozen, so these cannot go stale).
        sc = self.sched_config
        self._chunk_cap = self._admission.chunk_cap
        self._max_batched = sc.max_num_batched_tokens
        self._max_seqs = sc.max_num_seqs
        self._model_limits = (
            self.model.vocab_size is not None or self.model.max_position_embeddings is not None
        )

    # -- requests in and out ---------------------------------------------------
    def add(
        self,
        request: Request,
        now: float | None = None,
        *,
        block_keys: Sequence[int] | None = None,
    ) -> RequestState:
        """Queue a request. One that can never be served is finished as rejected at
        once; check `state.status` / `state.finish_detail`.

        `block_keys`: the keys of the prompt's full blocks when the caller hashed them
        already (a fleet's router does), as `kvflow.kv.hashing` chains them for this
        block size and the request's extra keys; they are then not hashed again. A list
        is adopted as the request's own (not copied): the scheduler appends to it as
        decoding fills blocks, and the caller must not change it."""
        rid = request.request_id
        if rid in self.queues.active_ids:
            raise ValueError(f"request id {rid!r} is already queued or running")
        state = RequestState(request, self._eos_token_ids)
        now = request.arrival_time if now is None else now
        reason = self.rejection(request)
        if reason is not None:
            self._finish(state, FinishReason.REJECTED, now, reason)
            self.stats.num_rejected += 1
            return state
        if self.kv_manager.caching:
            if type(block_keys) is list:
                state.block_keys = block_keys  # adopted: no copy, no reference per key
            elif block_keys is not None:
                state.block_keys.extend(block_keys)
            self.kv_manager.extend_keys(state, state.num_prompt_tokens // self.block_size)
        self.queues.enqueue(state)
        return state

    def rejection(self, request: Request) -> str | None:
        """Why `request` can never be served here (the model's vocabulary or positions,
        `max_model_len`, the device tier's size), or None. `add` rejects such a request."""
        if self._model_limits:
            reason = self.model.rejection(request)
            if reason is not None:
                return reason
        num_prompt = len(request.prompt_token_ids)
        total = num_prompt + request.max_new_tokens
        max_len = self.sched_config.max_model_len
        if total > max_len:
            return (
                f"prompt ({num_prompt} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) = {total} exceeds max_model_len ({max_len})"
            )
        num_blocks = -(-total // self.block_size)
        if num_blocks > self.pool.num_blocks:
            return (
                f"needs {num_blocks} blocks of {self.block_size} tokens for {total} tokens, "
                f"the device tier holds {self.pool.num_blocks}"
            )
        return None

    def abort(
        self,
        request_id: str,
        now: float,
        *,
        reason: FinishReason = FinishReason.ABORTED,
        detail: str = "aborted by caller",
        defer_release: bool = False,
    ) -> RequestState | None:
        """Finish a queued or running request (as aborted, or with `reason`) and free
        its blocks. Returns its state, or None when no such request is active.

        With `defer_release` (a step that may still read the request's blocks is
        executing), the request is finished and its id free at once, but its blocks
        stay referenced until `release_deferred`."""
        state = self.queues.remove(request_id)
        if state is None:
            return None
        if defer_release:
            self.kv_manager.free_after_step(state)
        self._finish(state, reason, now, detail)
        if reason is FinishReason.ABORTED:
            self.stats.num_aborted += 1
        return state

    def release_deferred(self, now: float) -> None:
        """Release the blocks of requests aborted with `defer_release` (call it once
        the step that might read them has ended)."""
        self.kv_manager.release_deferred(now)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.loading)

    def next_event_time(self) -> float | None:
        """When a KV copy the scheduler waits for finishes, in virtual time (None when
        nothing is in flight or the copies are real)."""
        return self.store.next_event_time() if self.store.num_inflight else None

    def reap_copies(self, now: float) -> None:
        """Apply the KV copies finished by `now` without planning a step (when idle)."""
        if self.store.num_inflight:
            self.running.extend(self._loads.finish_copies(now))

    # -- the cache ---------------------------------------------------------------
    def locate(self, state: RequestState) -> PrefixLocation:
        """Where the leading full blocks of the request's known tokens are cached."""
        return self.kv_manager.locate(state)

    # -- planning --------------------------------------------------------------
    def plan(self, now: float, *, overlapped: bool = False) -> StepPlan:
        """Decide the next step and reserve its blocks.

        With `overlapped`, the previous plan is still executing (its commit comes before
        this plan's execution): requests it samples are planned one token further, none
        is planned past its last token, and nothing is preempted, so no block the
        running step may touch is freed."""
        stats = self.stats
        stats.num_steps += 1
        view = self.view
        view._begin_step(now, self.pool.num_free_blocks, len(self.running), len(self.waiting))
        if self.store.num_inflight or self._loads.ready_now:
            self.running.extend(self._loads.finish_copies(now))
        if self._policy_drops and self.waiting:
            self._apply_drops(now)
        batch = Batch(self._max_batched)
        preempted: list[str] = []
        short_of_blocks = self._schedule_running(batch, preempted, now, overlapped)
        self.last_plan_short_of_blocks = short_of_blocks
        if (
            not preempted
            and not short_of_blocks
            and self.waiting
            and batch.budget > 0
            and (
                len(self.running) + len(self.loading) < self._max_seqs
                or (self._policy_preempts and not overlapped)
            )
        ):
            self._admission.schedule(batch, preempted, now, overlapped)
        plan = StepPlan(
            step_id=stats.num_steps,
            now=now,
            requests=batch.requests,
            num_tokens=batch.num_tokens,
            start_positions=batch.start_positions,
            num_prefill_tokens=batch.num_prefill_tokens,
            num_decode_tokens=batch.num_decode_tokens,
            num_kv_tokens=batch.num_kv_tokens,
            preempted_ids=preempted,
            block_tables=batch.block_tables,
        )
        if self._policy_on_step:
            self.policy.on_step(plan, view)
        return plan

    def _schedule_running(
        self, batch: Batch, preempted: list[str], now: float, overlapped: bool
    ) -> bool:
        """Schedule running requests; True when one was left out for want of blocks
        (then no new request may take the blocks it waits for)."""
        # `Batch.add` inlined: this loop runs once per running request per step.
        short_of_blocks = False
        running = self.running
        pool = self.pool  # its free count read inline, not through a call
        bs = self.block_size
        cap = self._chunk_cap
        add_request = batch.requests.append
        add_tokens = batch.num_tokens.append
        add_start = batch.start_positions.append
        add_table = batch.block_tables.append
        budget = batch.budget
        num_decode = num_prefill = kv_tokens = 0
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            start = req.num_computed_tokens
            inflight = req.num_inflight_samples
            num_known = len(req.token_ids) + inflight
            n = num_known - start
            if inflight and num_known - req.num_prompt_tokens >= req.max_new_tokens:
                i += 1  # its last token is being sampled: it finishes at that commit
                continue
            if n > 1:
                n = min(n, cap, budget)
            need = (start + n + bs - 1) // bs - len(req.block_ids)
            if need > 0:
                if need > pool.num_free_blocks:
                    if overlapped:
                        short_of_blocks = True
                        i += 1  # no preemption while a step runs: try again next step
                        continue
                    while need > pool.num_free_blocks:
                        victim = self.policy.victim(running[i:], self.view)
                        if victim is req and self.loading:
                            # Blocks are held by requests loading their prefix, which
                            # no victim choice sees until they run: wait for them
                            # rather than give up this one's progress (preempting
                            # itself step after step, two requests could each undo
                            # the other's forever).
                            short_of_blocks = True
                            break
                        self._preempt(victim, now, running[i:])
                        preempted.append(victim.request_id)
                        if victim is req:
                            break
                    if req.status is not _RUNNING:
                        continue  # running[i] is now the next request
                    if need > pool.num_free_blocks:
                        i += 1  # it waits for the loading requests (above)
                        continue
                self.kv_manager.allocate_slots(req, need)
            end = start + n
            add_request(req)
            add_tokens(n)
            add_start(start)
            add_table(req.block_ids)
            if end == num_known:
                req.num_inflight_samples = inflight + 1
            req.num_computed_tokens = end
            kv_tokens += end
            if n == 1:
                num_decode += 1
            else:
                num_prefill += n
            budget -= n
            i += 1
        batch.budget = budget
        batch.num_decode_tokens += num_decode
        batch.num_prefill_tokens += num_prefill
        batch.num_kv_tokens += kv_tokens
        return short_of_blocks

    def _apply_drops(self, now: float) -> None:
        drops = list(self.policy.drop(list(self.waiting.values()), self.view))
        for state, reason in drops:
            if self.waiting.pop(state.request_id, None) is not None:
                self._finish(state, FinishReason.REJECTED, now, reason)
                self.stats.num_rejected += 1

    # -- invariants ----------------------------------------------------------------
    def num_leaked_blocks(self) -> int:
        """Blocks still referenced beyond what active requests hold (0 unless a bug)."""
        return integrity.num_leaked_blocks(self)

    def check_integrity(self) -> None:
        """Raise `IntegrityError` when the queues, the requests' blocks and the pool's
        refcounts disagree."""
        integrity.check_integrity(self)
