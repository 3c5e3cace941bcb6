"""The step planner: synchronous, deterministic, no clock and no awaits.

`plan(now)` decides the next step: running requests first (one token per decode, the
next chunk for a prefill), then waiting requests in the policy's order while budget,
slots and blocks remain. It allocates device blocks and advances each scheduled
request's `num_computed_tokens`. `commit(plan, result, now)` applies the runner's
sampled tokens: appends them, seals full blocks into the prefix cache, and finishes
requests. Time only comes in as an argument, so the same code drives a real engine
and a virtual-time replay.

Helpers the `Scheduler` owns: `kv_manager.KVManager` (cache lookups, the requests'
blocks: allocated, sealed, freed), `loads.Loads` (requests waiting for copies from lower
tiers), `batch.Batch` (the plan being built); `integrity` holds the checks of its
invariants.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.config import KVFlowConfig
from kvflow.kv.location import PrefixLocation
from kvflow.kv.store import KVStore
from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import FinishReason, Request, RequestState, RequestStatus, TokenLogprobs
from kvflow.scheduler import integrity
from kvflow.scheduler.batch import Batch
from kvflow.scheduler.kv_manager import KVManager
from kvflow.scheduler.loads import Loads
from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult
from kvflow.scheduler.stats import SchedulerStats

# Enum members bound once (in Python 3.11 `RequestStatus.RUNNING` goes through
# `EnumType.__getattr__`, ~1k instructions): read per request or per step here.
_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_FINISHED = RequestStatus.FINISHED
_LENGTH = FinishReason.LENGTH
_STOP = FinishReason.STOP


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
        self.waiting: dict[str, RequestState] = {}
        self.running: list[RequestState] = []
        self.stats = SchedulerStats()
        self.kv_manager = kv = KVManager(self.store, self.sched_config, self.stats)
        self.pool = kv.pool
        """The device pool: the one `kv_manager` drives (`store.device`), the same
        object under a short name for callers and the per-step reads of its free count."""
        self._loads = Loads(self.store, self.stats)
        self.loading = self._loads.loading
        """Admitted requests in WAITING_FOR_KV: their prefix is being copied to device."""
        self.last_plan_short_of_blocks = False
        """The last plan left a running request out for want of blocks (it could not
        preempt: it was planned while a step ran)."""
        self.view = SchedulerView(self.block_size, self.sched_config.max_num_seqs, kv.locate)
        self._active_ids: set[str] = set()
        """Ids of the requests in `waiting`, `loading` and `running`."""
        self._policy_drops = policy.drops_requests()
        self._policy_on_step = type(policy).on_step is not Policy.on_step
        self._policy_preempts = type(policy).preempt_for is not Policy.preempt_for
        threshold = self.sched_config.long_prefill_threshold
        self._chunk_cap = threshold if threshold is not None else 1 << 62
        # A scan of the waiting queue skips at most this many deferred requests per step.
        self._max_skipped = max(self.sched_config.max_num_seqs, 64)
        # The knobs read at every step, as plain attributes: a pydantic model's field is
        # read through its `__getattr__` hook, several times the cost (the config is
        # frozen, so these cannot go stale).
        sc = self.sched_config
        self._max_batched = sc.max_num_batched_tokens
        self._max_seqs = sc.max_num_seqs
        self._sharing = sc.enable_inbatch_prefix_sharing and sc.enable_prefix_caching
        self._eos_token_ids = frozenset(self.model.eos_token_ids)
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
        if rid in self._active_ids:
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
        self.waiting[rid] = state
        self._active_ids.add(rid)
        self.policy.on_add(state, self.view)
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
        state = self.waiting.pop(request_id, None)
        if state is None:
            state = self._loads.cancel(request_id)
        if state is None:
            state = next((r for r in self.running if r.request_id == request_id), None)
            if state is None:
                return None
            self.running.remove(state)
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
            self._schedule_waiting(batch, preempted, now, overlapped)
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
                        self._check_victim(victim, running[i:])
                        self._preempt(victim, now)
                        preempted.append(victim.request_id)
                        if victim is req:
                            break
                    if req.status is not _RUNNING:
                        continue  # running[i] is now the next request
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

    def _schedule_waiting(
        self, batch: Batch, preempted: list[str], now: float, overlapped: bool
    ) -> None:
        max_seqs = self._max_seqs
        sharing = self._sharing
        pending: set[int] | None = None
        admitted: list[RequestState] = []
        num_skipped = 0
        for req in self.policy.order(list(self.waiting.values()), self.view):
            if batch.budget <= 0:
                break
            if sharing:
                if pending is None:
                    pending = self._pending_keys()
                if self._shares_pending_prefix(req, pending):
                    num_skipped += 1
                    if num_skipped > self._max_skipped:
                        break
                    continue
            if not self._try_admit(req, batch, preempted, now, max_seqs, overlapped):
                break
            admitted.append(req)
            if pending is not None:
                pending.update(req.block_keys[req.num_sealed_blocks :])
        waiting = self.waiting  # a preemption above may have rebuilt it
        for req in admitted:
            if req.status is not _PREEMPTED:  # not undone by a later admission
                del waiting[req.request_id]

    def _try_admit(
        self,
        req: RequestState,
        batch: Batch,
        preempted: list[str],
        now: float,
        max_seqs: int,
        overlapped: bool,
    ) -> bool:
        bs = self.block_size
        kv = self.kv_manager
        num_tokens = len(req.token_ids)
        while True:
            cached = kv.lookup(req, num_tokens)
            num_hits = len(cached.device_ids)
            pull = cached.pull
            num_pulled = pull.num_blocks if pull is not None else 0
            num_cached = (num_hits + len(cached.below) + num_pulled) * bs
            # A request that loads runs nothing this step; otherwise it takes a chunk.
            loads = bool(cached.below) or pull is not None
            n = 0 if loads else min(num_tokens - num_cached, self._chunk_cap, batch.budget)
            num_new = (num_cached + n + bs - 1) // bs - num_hits
            if kv.can_admit(cached, num_new) and len(self.running) + len(self.loading) < max_seqs:
                break
            if overlapped:
                return False
            victim = self.policy.preempt_for(req, self.running, self.view)
            if victim is None:
                return False
            self._check_victim(victim, self.running)
            if victim in batch.requests:
                batch.remove(victim)
            self._preempt(victim, now)
            preempted.append(victim.request_id)
        kv.admit(req, cached, num_new)
        first_admission = kv.count_hits(req, cached, num_tokens, now)
        if loads:
            self._loads.start(req, cached.below, num_hits, first_admission, now, pull)
            return True
        req.status = _RUNNING
        self.running.append(req)
        batch.add(req, num_cached, n)
        return True

    def _pending_keys(self) -> set[int]:
        """Keys of blocks that running requests are computing and have not sealed."""
        pending: set[int] = set()
        for r in self.running:
            if len(r.block_keys) > r.num_sealed_blocks:
                pending.update(r.block_keys[r.num_sealed_blocks :])
        for r in self.loading.values():
            pending.update(r.block_keys[r.num_sealed_blocks :])
        return pending

    def _shares_pending_prefix(self, req: RequestState, pending: set[int]) -> bool:
        if not pending:
            return False
        # The step's memoized answer (the policy usually asked already): blocks evicted
        # since can only make it longer, past the first pending block, never shorter.
        n = self.view.locate(req).device_tokens // self.block_size
        keys = req.block_keys
        return n < len(keys) and keys[n] in pending

    def _apply_drops(self, now: float) -> None:
        drops = list(self.policy.drop(list(self.waiting.values()), self.view))
        for state, reason in drops:
            if self.waiting.pop(state.request_id, None) is not None:
                self._finish(state, FinishReason.REJECTED, now, reason)
                self.stats.num_rejected += 1

    @staticmethod
    def _check_victim(victim: RequestState, candidates: Sequence[RequestState]) -> None:
        if victim.status is not _RUNNING or victim not in candidates:
            raise ValueError(
                f"policy chose {victim.request_id!r} as a victim, which is not one of "
                "the running candidates"
            )

    # -- results ---------------------------------------------------------------
    def commit(self, plan: StepPlan, result: StepResult, now: float) -> list[RequestState]:
        """Apply a step's results. Returns the requests that finished in this step."""
        sampled = result.sampled_token_ids
        if len(sampled) != len(plan.requests):
            raise ValueError(
                f"step {plan.step_id}: runner returned {len(sampled)} sampled tokens "
                f"for {len(plan.requests)} scheduled requests"
            )
        if result.logprobs is not None:
            self._commit_logprobs(plan, result.logprobs)
        bs = self.block_size
        caching = self.kv_manager.caching
        seal = self.kv_manager.seal
        finished: list[RequestState] = []
        entries = zip(plan.requests, plan.start_positions, plan.num_tokens, sampled, strict=True)
        for req, start, n, token in entries:
            if req.status is not _RUNNING:
                continue  # aborted since the plan
            end = start + n
            if caching and end // bs > req.num_sealed_blocks:
                seal(req, end // bs, now)
            tokens = req.token_ids
            if end != len(tokens):
                continue  # a prefill chunk short of the end samples nothing
            req.num_inflight_samples -= 1
            if token is None:
                raise ValueError(
                    f"step {plan.step_id}: no token sampled for {req.request_id!r}, "
                    "which completed its prefill"
                )
            tokens.append(token)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            if len(tokens) - req.num_prompt_tokens >= req.max_new_tokens:
                self._finish(req, _LENGTH, now)
                finished.append(req)
            elif token in req.stop_token_ids:
                self._finish(req, _STOP, now, self._stop_detail(req, token))
                finished.append(req)
        if finished:
            self.running = [r for r in self.running if r.status is _RUNNING]
        return finished

    @staticmethod
    def _commit_logprobs(plan: StepPlan, logprobs: Sequence[TokenLogprobs | None]) -> None:
        """Keep the log-probabilities of the tokens `commit` appends (the same entries:
        running, and sampling at the end of their tokens). Apart from the token loop,
        so steps without log-probabilities pay nothing."""
        for req, start, n, lp in zip(
            plan.requests, plan.start_positions, plan.num_tokens, logprobs, strict=True
        ):
            if (
                lp is not None
                and req.logprobs is not None
                and req.status is _RUNNING
                and start + n == len(req.token_ids)
            ):
                req.logprobs.append(lp)

    def _stop_detail(self, req: RequestState, token: int) -> str:
        # The model's EOS is named first when a token is both, as vLLM checks it first.
        eos = token in self._eos_token_ids and not req.request.sampling.ignore_eos
        return f"{'eos' if eos else 'stop'} token {token}"

    # -- state changes -----------------------------------------------------------
    def _preempt(self, req: RequestState, now: float) -> None:
        """Queue a running request again at the front, its blocks released (swapped
        down or dropped: `KVManager.free_preempted`)."""
        self.running.remove(req)
        if self.kv_manager.free_preempted(req, now):
            self.stats.num_swaps += 1
        req.num_computed_tokens = 0
        req.num_inflight_samples = 0
        req.status = _PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting = {req.request_id: req, **self.waiting}

    def _finish(
        self, req: RequestState, reason: FinishReason, now: float, detail: str = ""
    ) -> None:
        self.kv_manager.free(req, now)
        self._active_ids.discard(req.request_id)
        req.status = _FINISHED
        req.finish_reason = reason
        req.finish_detail = detail
        req.finish_time = now
        self.policy.on_finish(req, self.view)

    # -- invariants ----------------------------------------------------------------
    def num_leaked_blocks(self) -> int:
        """Blocks still referenced beyond what active requests hold (0 unless a bug)."""
        return integrity.num_leaked_blocks(self)

    def check_integrity(self) -> None:
        """Raise `IntegrityError` when the queues, the requests' blocks and the pool's
        refcounts disagree."""
        integrity.check_integrity(self)
