"""The step planner: synchronous, deterministic, no clock and no awaits.

`plan(now)` decides the next step: running requests first (one token per decode, the
next chunk for a prefill), then waiting requests in the policy's order while budget,
slots and blocks remain. It allocates device blocks and advances each scheduled
request's `num_computed_tokens`. `commit(plan, result, now)` applies the runner's
sampled tokens: appends them, seals full blocks into the prefix cache, and finishes
requests. Time only comes in as an argument, so the same code drives a real engine
and a virtual-time replay.

Helpers the `Scheduler` owns: `prefix.PrefixMatcher` (block keys and device matches),
`loads.Loads` (requests waiting for copies from lower tiers), `batch.Batch` (the plan
being built); `integrity` holds the checks of its invariants.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.config import KVFlowConfig
from kvflow.kv.block_pool import IntArray
from kvflow.kv.location import PrefixLocation
from kvflow.kv.remote import RemoteRun
from kvflow.kv.store import KVStore, TierName
from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import FinishReason, Request, RequestState, RequestStatus, TokenLogprobs
from kvflow.scheduler import integrity
from kvflow.scheduler.batch import Batch
from kvflow.scheduler.loads import Loads
from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult
from kvflow.scheduler.prefix import PrefixMatcher
from kvflow.scheduler.stats import SchedulerStats

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
        self.pool = self.store.device
        self.block_size = self.store.block_size
        self.policy = policy
        self.waiting: dict[str, RequestState] = {}
        self.running: list[RequestState] = []
        self.stats = SchedulerStats()
        self._loads = Loads(self.store, self.stats)
        self.loading = self._loads.loading
        """Admitted requests in WAITING_FOR_KV: their prefix is being copied to device."""
        self.last_plan_short_of_blocks = False
        """The last plan left a running request out for want of blocks (it could not
        preempt: it was planned while a step ran)."""
        self.view = SchedulerView(self.block_size, self.sched_config.max_num_seqs, self.locate)
        self._prefix = prefix = PrefixMatcher(self.pool, self.block_size)
        # Bound once: these run per request per step.
        self._match_device = prefix.match_device
        self._extend_keys = prefix.extend_keys
        self._matches = prefix.matches
        self._active_ids: set[str] = set()
        """Ids of the requests in `waiting`, `loading` and `running`."""
        self._policy_drops = policy.drops_requests()
        self._policy_on_step = type(policy).on_step is not Policy.on_step
        self._policy_preempts = type(policy).preempt_for is not Policy.preempt_for
        self._write_through = self.store.write_through and self.store.has_lower_tiers
        threshold = self.sched_config.long_prefill_threshold
        self._chunk_cap = threshold if threshold is not None else 1 << 62
        # A scan of the waiting queue skips at most this many deferred requests per step.
        self._max_skipped = max(self.sched_config.max_num_seqs, 64)
        self._eos_token_ids = frozenset(self.model.eos_token_ids)
        self._model_limits = (
            self.model.vocab_size is not None or self.model.max_position_embeddings is not None
        )
        self._deferred_blocks: list[list[int]] = []
        """Blocks of requests aborted while a step ran (`abort(defer_release=True)`),
        held until `release_deferred`."""

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
        if self.sched_config.enable_prefix_caching:
            if type(block_keys) is list:
                state.block_keys = block_keys  # adopted: no copy, no reference per key
            elif block_keys is not None:
                state.block_keys.extend(block_keys)
            self._extend_keys(state, state.num_prompt_tokens // self.block_size)
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
        if defer_release and state.block_ids:
            self._deferred_blocks.append(state.block_ids)
            state.block_ids = []
        self._finish(state, reason, now, detail)
        if reason is FinishReason.ABORTED:
            self.stats.num_aborted += 1
        return state

    def release_deferred(self, now: float) -> None:
        """Release the blocks of requests aborted with `defer_release` (call it once
        the step that might read them has ended)."""
        for block_ids in self._deferred_blocks:
            self.store.release_device(block_ids, now, keep=True)
        self._deferred_blocks.clear()

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
        if not self.sched_config.enable_prefix_caching:
            return PrefixLocation()
        n = (state.num_tokens - 1) // self.block_size
        match = self._match_device(state, n)
        keys = state.block_keys
        return self.store.locate(keys if len(keys) == n else keys[:n], len(match.block_ids))

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
        batch = Batch(self.sched_config.max_num_batched_tokens)
        preempted: list[str] = []
        short_of_blocks = self._schedule_running(batch, preempted, now, overlapped)
        self.last_plan_short_of_blocks = short_of_blocks
        if (
            not preempted
            and not short_of_blocks
            and self.waiting
            and batch.budget > 0
            and (
                len(self.running) + len(self.loading) < self.sched_config.max_num_seqs
                or (self._policy_preempts and not overlapped)
            )
        ):
            self._schedule_waiting(batch, preempted, now, overlapped)
        plan = StepPlan(
            step_id=stats.num_steps,
            now=now,
            requests=batch.requests,
            num_tokens=batch.tokens,
            start_positions=batch.starts,
            num_prefill_tokens=batch.num_prefill,
            num_decode_tokens=batch.num_decode,
            num_kv_tokens=batch.kv_tokens,
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
        pool = self.pool
        bs = self.block_size
        cap = self._chunk_cap
        add_request = batch.requests.append
        add_tokens = batch.tokens.append
        add_start = batch.starts.append
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
                if need > pool.num_free_blocks and overlapped:
                    short_of_blocks = True
                    i += 1  # no preemption while a step runs: try again next step
                    continue
                if need > pool.num_free_blocks:
                    while need > pool.num_free_blocks:
                        victim = self.policy.victim(running[i:], self.view)
                        self._check_victim(victim, running[i:])
                        self._preempt(victim, now)
                        preempted.append(victim.request_id)
                        if victim is req:
                            break
                    if req.status is not _RUNNING:
                        continue  # running[i] is now the next request
                req.block_ids.extend(pool.allocate(need))
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
        batch.num_decode += num_decode
        batch.num_prefill += num_prefill
        batch.kv_tokens += kv_tokens
        return short_of_blocks

    def _schedule_waiting(
        self, batch: Batch, preempted: list[str], now: float, overlapped: bool
    ) -> None:
        max_seqs = self.sched_config.max_num_seqs
        sharing = self.sched_config.enable_inbatch_prefix_sharing
        pending: set[int] | None = None
        admitted: list[RequestState] = []
        num_skipped = 0
        for req in self.policy.order(list(self.waiting.values()), self.view):
            if batch.budget <= 0:
                break
            if sharing and self.sched_config.enable_prefix_caching:
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
            if req.status is not RequestStatus.PREEMPTED:  # not undone by a later admission
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
        pool = self.pool
        store = self.store
        num_tokens = len(req.token_ids)
        while True:
            hits: list[int] = []
            hit_ids: IntArray | list[int] = hits
            below: list[tuple[TierName, int]] = []
            pull: RemoteRun | None = None
            if self.sched_config.enable_prefix_caching:
                max_hit_blocks = (num_tokens - 1) // bs
                match = self._match_device(req, max_hit_blocks)
                hits, hit_ids = match.block_ids, match.ids
                if store.has_lower_tiers and len(hits) < max_hit_blocks:
                    below = store.find_below(req.block_keys, len(hits), max_hit_blocks)
                    if below and not store.costs.should_load(below):
                        below = []  # recomputing them is cheaper, and what follows
                    elif store.remote is not None:
                        pull = self._find_pull(req, len(hits), below, max_hit_blocks)
            num_pulled = pull.num_blocks if pull is not None else 0
            num_cached = (len(hits) + len(below) + num_pulled) * bs
            # A request that loads runs nothing this step; otherwise it takes a chunk.
            loads = bool(below) or pull is not None
            n = 0 if loads else min(num_tokens - num_cached, self._chunk_cap, batch.budget)
            num_new = (num_cached + n + bs - 1) // bs - len(hits)
            num_free = pool.num_free_blocks
            # Touching a hit takes it out of the free pool if nobody held it; counting
            # those is only needed when the pool is nearly full.
            blocks_short = num_new + len(hits) > num_free and (
                num_new + pool.num_evictable_among(hit_ids) > num_free
            )
            if not blocks_short and len(self.running) + len(self.loading) < max_seqs:
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
        self._matches.pop(req.request_id, None)
        pool.touch(hit_ids)
        req.block_ids = hits + pool.allocate(num_new)
        req.num_sealed_blocks = len(hits)
        first_admission = self._count_hits(req, len(hits), below, num_pulled, num_tokens, now)
        if loads:
            self._loads.start(req, below, len(hits), first_admission, now, pull)
            return True
        req.status = _RUNNING
        self.running.append(req)
        batch.add(req, num_cached, n)
        return True

    def _find_pull(
        self,
        req: RequestState,
        num_device: int,
        below: Sequence[tuple[TierName, int]],
        max_hit_blocks: int,
    ) -> RemoteRun | None:
        """The run after the local hits that a peer holds, when pulling it beats
        recomputing it (else None: those tokens are recomputed)."""
        store = self.store
        run = store.find_remote(req.block_keys, num_device + len(below), max_hit_blocks)
        if run is None or not store.costs.should_pull(run.num_blocks):
            return None
        return run

    def _count_hits(
        self,
        req: RequestState,
        num_device: int,
        below: Sequence[tuple[TierName, int]],
        num_pulled: int,
        num_tokens: int,
        now: float,
    ) -> bool:
        """Count an admission's hits by tier: a first admission's as prefix hits (it sets
        the request's `num_cached_tokens`), a preempted request's re-admission apart, so
        its own swapped blocks are no prefix hit. Returns whether it is the first."""
        bs = self.block_size
        stats = self.stats
        first_admission = req.first_scheduled_time is None
        num_cpu = sum(1 for tier, _ in below if tier == "cpu")
        stats.count_hits(first_admission, "device", num_device * bs)
        stats.count_hits(first_admission, "cpu", num_cpu * bs)
        stats.count_hits(first_admission, "disk", (len(below) - num_cpu) * bs)
        if num_pulled:
            stats.count_hits(first_admission, "peer", num_pulled * bs)
        if not first_admission:
            stats.readmission_query_tokens += num_tokens
            return False
        stats.prefix_query_tokens += num_tokens
        req.first_scheduled_time = now
        req.num_cached_tokens = (num_device + len(below) + num_pulled) * bs
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
        caching = self.sched_config.enable_prefix_caching
        finished: list[RequestState] = []
        entries = zip(plan.requests, plan.start_positions, plan.num_tokens, sampled, strict=True)
        for req, start, n, token in entries:
            if req.status is not _RUNNING:
                continue  # aborted since the plan
            end = start + n
            if caching and end // bs > req.num_sealed_blocks:
                self._seal(req, end // bs, now)
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
                self._finish(req, FinishReason.LENGTH, now)
                finished.append(req)
            elif token in req.stop_token_ids:
                self._finish(req, FinishReason.STOP, now, self._stop_detail(req, token))
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

    def _seal(self, req: RequestState, num_full: int, now: float) -> None:
        self._extend_keys(req, num_full)
        first = req.num_sealed_blocks
        if num_full - first == 1:  # a decode filled its last block: no slicing
            block = req.block_ids[first]
            if self.pool.seal(block, req.block_keys[first], first) and self._write_through:
                self.store.on_sealed(block, now)
        else:
            blocks = req.block_ids[first:num_full]
            sealed = self.pool.seal_many(blocks, req.block_keys[first:num_full], first)
            if self._write_through:
                for b in sealed:
                    self.store.on_sealed(b, now)
        req.num_sealed_blocks = num_full

    # -- state changes -----------------------------------------------------------
    def _preempt(self, req: RequestState, now: float) -> None:
        """Queue a running request again at the front. Its blocks are released; with
        swap they go down to the cpu tier (and come back through a prefix hit on
        resume), with recompute they are dropped (a cost estimate chooses, by config)."""
        self.running.remove(req)
        mode = self.sched_config.preemption_mode
        swap = self.store.has_lower_tiers and (
            mode == "swap"
            or (mode == "auto" and self.store.costs.swap_is_cheaper(req.num_sealed_blocks))
        )
        if swap:
            self.stats.num_swaps += 1
        self.store.release_device(req.block_ids, now, keep=swap)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_inflight_samples = 0
        req.num_sealed_blocks = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting = {req.request_id: req, **self.waiting}

    def _finish(
        self, req: RequestState, reason: FinishReason, now: float, detail: str = ""
    ) -> None:
        if req.block_ids:
            self.store.release_device(req.block_ids, now, keep=True)
            req.block_ids = []
        self._active_ids.discard(req.request_id)
        self._matches.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED
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
