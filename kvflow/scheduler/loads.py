"""Loads from lower tiers: an admitted request whose prefix is cached below the device
waits in WAITING_FOR_KV while its blocks are copied up, then joins the running ones."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.kv.store import KVStore, TierName
from kvflow.request import RequestState, RequestStatus
from kvflow.scheduler.stats import SchedulerStats


class Load:
    """A request's copies from lower tiers, from admission until its prefix is on device."""

    __slots__ = ("counted_end", "first", "first_admission", "started", "tiers", "transfer_ids")

    def __init__(
        self,
        transfer_ids: set[int],
        started: float,
        first: int,
        tiers: list[TierName],
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

    def start(
        self,
        req: RequestState,
        below: Sequence[tuple[TierName, int]],
        first: int,
        first_admission: bool,
        now: float,
    ) -> None:
        """Copy the blocks `below` into the request's blocks from index `first` on (its
        device hits come before); it waits in WAITING_FOR_KV until they arrive."""
        keys = req.block_keys[first : first + len(below)]
        transfers = self.store.start_load(below, keys, req.block_ids[first:], now)
        req.num_computed_tokens = (first + len(below)) * self.block_size
        req.status = RequestStatus.WAITING_FOR_KV
        rid = req.request_id
        self.loading[rid] = req
        tiers = [tier for tier, _ in below]
        self.waits[rid] = Load(
            {t.transfer_id for t in transfers}, now, first, tiers, first_admission
        )
        for t in transfers:
            self._owner[t.transfer_id] = rid

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
        for transfer, ok in self.store.poll(now):
            rid = self._owner.pop(transfer.transfer_id, None)
            if rid is None or rid not in self.loading:
                continue  # a demotion, or the request was aborted meanwhile
            load = self.waits[rid]
            req = self.loading[rid]
            failed = transfer.dst_slots[ok.index(False)] if not all(ok) else None
            if failed is not None and failed in req.block_ids:  # else cut short already
                # Blocks from the first failed one on are recomputed instead.
                keep = req.block_ids.index(failed)
                dropped = req.block_ids[keep:]
                req.block_ids = req.block_ids[:keep]
                req.num_computed_tokens = keep * self.block_size
                self.store.release_device(dropped, now, keep=False)
                self._uncount_hits(req, load, keep)
            load.transfer_ids.discard(transfer.transfer_id)
            if load.transfer_ids:
                continue
            del self.loading[rid]
            del self.waits[rid]
            req.num_sealed_blocks = len(req.block_ids)
            req.kv_wait_s += now - load.started
            req.status = RequestStatus.RUNNING
            ready.append(req)
        return ready

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
