"""Admission: waiting requests join the step in the policy's order while budget, slots
and blocks remain, each with its cached prefix (device hits taken, lower tiers' and
peers' runs loaded, the rest computed); the policy may preempt running requests for
one. With in-batch prefix sharing, a request whose next block a running or loading
request is computing waits for it instead of computing it too."""

from __future__ import annotations

from kvflow.config import SchedulerConfig
from kvflow.policies.base import Policy
from kvflow.request import RequestState, RequestStatus
from kvflow.scheduler.batch import Batch
from kvflow.scheduler.kv_manager import KVManager
from kvflow.scheduler.queues import RequestQueues

# Bound once: read per request (see `kvflow.scheduler.queues`).
_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED


class Admission:
    """Admits one scheduler's waiting requests.

    Args:
        queues: the scheduler's requests (admitted ones move from `waiting`).
        kv: the scheduler's KV manager (cache lookups, blocks taken).
        policy: orders the waiting requests and chooses whom to preempt for one.
        config: the scheduler's configuration (limits, chunking, prefix sharing).
    """

    def __init__(
        self, queues: RequestQueues, kv: KVManager, policy: Policy, config: SchedulerConfig
    ) -> None:
        self.queues = queues
        # The queues' containers, read per admission (they change in place, never rebound).
        self.waiting = queues.waiting
        self.running = queues.running
        self.loading = queues.loading
        self.kv = kv
        self.policy = policy
        self.view = queues.view
        self.block_size = kv.block_size
        self.max_num_seqs = config.max_num_seqs
        threshold = config.long_prefill_threshold
        self.chunk_cap = threshold if threshold is not None else 1 << 62
        """Most prompt tokens a request computes in one step."""
        self._sharing = config.enable_inbatch_prefix_sharing and config.enable_prefix_caching
        # A scan of the waiting queue skips at most this many deferred requests per step.
        self._max_skipped = max(config.max_num_seqs, 64)

    def schedule(self, batch: Batch, preempted: list[str], now: float, overlapped: bool) -> None:
        """Admit waiting requests into `batch` (see `Scheduler.plan`); the ids of the
        requests preempted for them are appended to `preempted`."""
        sharing = self._sharing
        pending: set[int] | None = None
        admitted: list[RequestState] = []
        num_skipped = 0
        waiting = self.waiting
        for req in self.policy.order(list(waiting.values()), self.view):
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
            if not self._try_admit(req, batch, preempted, now, overlapped):
                break
            admitted.append(req)
            if pending is not None:
                pending.update(req.block_keys[req.num_sealed_blocks :])
        for req in admitted:
            if req.status is not _PREEMPTED:  # not undone by a later admission
                del waiting[req.request_id]

    def _try_admit(
        self,
        req: RequestState,
        batch: Batch,
        preempted: list[str],
        now: float,
        overlapped: bool,
    ) -> bool:
        bs = self.block_size
        kv = self.kv
        num_tokens = len(req.token_ids)
        while True:
            cached = kv.lookup(req, num_tokens)
            num_hits = len(cached.device_ids)
            pull = cached.pull
            num_pulled = pull.num_blocks if pull is not None else 0
            num_cached = (num_hits + len(cached.below) + num_pulled) * bs
            # A request that loads runs nothing this step; otherwise it takes a chunk.
            loads = bool(cached.below) or pull is not None
            n = 0 if loads else min(num_tokens - num_cached, self.chunk_cap, batch.budget)
            num_new = (num_cached + n + bs - 1) // bs - num_hits
            if (
                kv.can_admit(cached, num_new)
                and len(self.running) + len(self.loading) < self.max_num_seqs
            ):
                break
            if overlapped:
                return False
            victim = self.policy.preempt_for(req, self.running, self.view)
            if victim is None:
                return False
            if victim in batch.requests:
                batch.remove(victim)
            self.queues.preempt(victim, now, self.running)
            preempted.append(victim.request_id)
        kv.admit(req, cached, num_new)
        first_admission = kv.count_hits(req, cached, num_tokens, now)
        if loads:
            self.queues.loads.start(req, cached.below, num_hits, first_admission, now, pull)
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
