"""Loads from lower tiers: an admitted request whose prefix is cached below the device
waits in WAITING_FOR_KV while its blocks are copied up, then joins the running ones.

A run held by a peer (the store's remote tier) is pulled into the cpu tier first, then
promoted to device like any cpu hit; blocks that do not land (a stale hint, a bad
checksum, a peer down or timed out) are recomputed from the first missing one on."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.kv.remote import RemoteRun
from kvflow.kv.store import KVStore, TierName
from kvflow.kv.transfer import Transfer
from kvflow.request import RequestState, RequestStatus
from kvflow.scheduler.stats import SchedulerStats


class Load:
    """A request's copies from lower tiers, from admission until its prefix is on device."""

    __slots__ = (
        "counted_end",
        "first",
        "first_admission",
        "pull_first",
        "pull_id",
        "started",
        "tiers",
        "transfer_ids",
    )

    def __init__(
        self,
        transfer_ids: set[int],
        started: float,
        first: int,
        tiers: list[str],
        first_admission: bool,
    ) -> None:
        self.transfer_ids = transfer_ids
        """Copies still in flight."""
        self.started = started
        self.first = first
        """Index in the request's blocks of the first loaded block."""
        self.tiers = tiers
        """The tier each loaded block comes from (counted as a hit from it)."""
        self.counted_end = first + len(tiers)
        """Loaded blocks before this index still count as hits (a failed copy cuts it)."""
        self.first_admission = first_admission
        """This admission set the request's `num_cached_tokens`."""
        self.pull_id = -1
        """The transfer pulling blocks from a peer into cpu (-1: none)."""
        self.pull_first = 0
        """Index in the request's blocks of the first pulled block."""


class Loads:
    """The requests loading their prefix, and the copies each waits for.

    Args:
        store: the KV store the copies go through.
        stats: the scheduler's statistics (a failed copy takes back its hits).
    """

    def __init__(self, store: KVStore, stats: SchedulerStats) -> None:
        self.store = store
        self.stats = stats
        self.block_size = store.block_size
        self.loading: dict[str, RequestState] = {}
        """Admitted requests in WAITING_FOR_KV: their prefix is being copied to device."""
        self.waits: dict[str, Load] = {}
        self._owner: dict[int, str] = {}
        """The request each copy loads for, by transfer id."""
        self.ready_now: list[RequestState] = []
        """Loading requests left with nothing to wait for (their pull could not start)."""

    def start(
        self,
        req: RequestState,
        below: Sequence[tuple[TierName, int]],
        first: int,
        first_admission: bool,
        now: float,
        pull: RemoteRun | None = None,
    ) -> None:
        """Copy the blocks `below` into the request's blocks from index `first` on (its
        device hits come before), and pull the run `pull` after them from a peer; it
        waits in WAITING_FOR_KV until they arrive."""
        end = first + len(below)
        keys = req.block_keys[first:end]
        store = self.store
        transfers = store.start_load(below, keys, req.block_ids[first:end], now) if below else []
        num_pulled = pull.num_blocks if pull is not None else 0
        req.num_computed_tokens = (end + num_pulled) * self.block_size
        req.status = RequestStatus.WAITING_FOR_KV
        rid = req.request_id
        self.loading[rid] = req
        tiers: list[str] = [tier for tier, _ in below]
        tiers += ["peer"] * num_pulled
        load = Load({t.transfer_id for t in transfers}, now, first, tiers, first_admission)
        self.waits[rid] = load
        if pull is not None:
            t = store.start_pull(pull.peer, req.block_keys[end : end + num_pulled], now, end)
            load.pull_first = end
            if t is None:  # no room in cpu after all: recompute the run
                self._cut(req, load, end, now)
            else:
                load.pull_id = t.transfer_id
                transfers.append(t)
                load.transfer_ids.add(t.transfer_id)
        for t in transfers:
            self._owner[t.transfer_id] = rid
        if not load.transfer_ids:
            self.ready_now.append(req)

    def cancel(self, request_id: str) -> RequestState | None:
        """Stop waiting for a request's copies (it was aborted). Returns its state, or
        None when it is not loading. Its copies still finish; they are ignored."""
        state = self.loading.pop(request_id, None)
        if state is not None:
            self.waits.pop(request_id, None)
        return state

    def finish_copies(self, now: float) -> list[RequestState]:
        """Apply finished copies. Returns the requests whose prefix arrived, set to
        RUNNING, in the order they completed."""
        ready: list[RequestState] = []
        if self.ready_now:
            loading = self.loading
            ready.extend(
                self._done(r, now) for r in self.ready_now if loading.get(r.request_id) is r
            )
            self.ready_now.clear()
        for transfer, ok in self.store.poll(now):
            rid = self._owner.pop(transfer.transfer_id, None)
            if rid is None or rid not in self.loading:
                continue  # a demotion, or the request was aborted meanwhile
            load = self.waits[rid]
            req = self.loading[rid]
            if transfer.transfer_id == load.pull_id:
                self._pulled(req, load, transfer, now)
            else:
                failed = transfer.dst_slots[ok.index(False)] if not all(ok) else None
                if failed is not None and failed in req.block_ids:  # else cut short already
                    # Blocks from the first failed one on are recomputed instead.
                    self._cut(req, load, req.block_ids.index(failed), now)
            load.transfer_ids.discard(transfer.transfer_id)
            if load.transfer_ids:
                continue
            ready.append(self._done(req, now))
        return ready

    def _done(self, req: RequestState, now: float) -> RequestState:
        rid = req.request_id
        load = self.waits.pop(rid)
        del self.loading[rid]
        req.num_sealed_blocks = len(req.block_ids)
        req.kv_wait_s += now - load.started
        req.status = RequestStatus.RUNNING
        return req

    def _cut(self, req: RequestState, load: Load, keep: int, now: float) -> None:
        """Blocks from index `keep` on did not arrive: they are recomputed instead."""
        dropped = req.block_ids[keep:]
        req.block_ids = req.block_ids[:keep]
        req.num_computed_tokens = keep * self.block_size
        self.store.release_device(dropped, now, keep=False)
        self._uncount_hits(req, load, keep)

    def _pulled(self, req: RequestState, load: Load, pull: Transfer, now: float) -> None:
        """A pull from a peer ended: promote the blocks that landed in cpu to device (as
        any cpu hit), and recompute from the first that did not."""
        first = load.pull_first
        num_asked = load.counted_end - first if load.counted_end > first else 0
        if len(req.block_ids) < first + num_asked or num_asked == 0:
            return  # cut short already, by a failed load before the pulled run
        keys = req.block_keys[first : first + num_asked]
        slots = self.store.cpu_slots_of(keys[: len(pull.keys)])
        n = len(slots)
        if n < num_asked:
            self._cut(req, load, first + n, now)
        if not n:
            return
        below: list[tuple[TierName, int]] = [("cpu", s) for s in slots]
        transfers = self.store.start_load(below, keys[:n], req.block_ids[first : first + n], now)
        rid = req.request_id
        for t in transfers:
            load.transfer_ids.add(t.transfer_id)
            self._owner[t.transfer_id] = rid

    def _uncount_hits(self, req: RequestState, load: Load, keep: int) -> None:
        """Loaded blocks from index `keep` on failed to arrive: they are no hits."""
        if keep >= load.counted_end:
            return
        bs = self.block_size
        for tier in load.tiers[keep - load.first : load.counted_end - load.first]:
            self.stats.count_hits(load.first_admission, tier, -bs)
        if load.first_admission:
            req.num_cached_tokens -= (load.counted_end - keep) * bs
        load.counted_end = keep
