"""The store's pulls from peers, carried out for real: a `CopyEngine` for `peer_to_cpu`
transfers that the directory hands the store (`Directory.pull_engine`).

Each transfer runs as a task on the event loop that owns the store: it pulls the keys
from the named peer's connection straight into the transfer's cpu slots and reports the
leading run that landed intact; everything else (no connection, a refusal, a peer down
or timed out) is a miss, which the scheduler recomputes. A peer whose pull failed is
marked down in the directory (its hints are dropped until it is heard from again).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio.abc

from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore
from kvflow.kv.transfer import ThreadedCopyEngine, Transfer
from kvflow.peer.client import PeerClient, PeerDownError, PeerRequestError, slot_views
from kvflow.peer.directory import Directory


class PeerPuller(ThreadedCopyEngine):
    """Pulls `peer_to_cpu` transfers over `clients()` (peer id -> connection) in tasks of
    `task_group`. `submit` and `completed` run on the loop's thread; `wait` may block a
    worker thread until a pull ends."""

    def __init__(
        self,
        store: KVStore,
        directory: Directory,
        clients: Callable[[], dict[str, PeerClient]],
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        if store.cpu is None or store.cpu_storage is None:
            raise ValueError("pulling from peers needs a cpu tier with tensors (kv.cpu)")
        super().__init__()
        self._cpu_bytes = byte_view(store.cpu_storage.data)
        self._bytes_per_block = store.bytes_per_block
        self._directory = directory
        self._clients = clients
        self._tg = task_group

    def submit(self, transfer: Transfer, now: float) -> None:
        self._start(transfer)
        self._tg.start_soon(self._pull, transfer)

    async def _pull(self, t: Transfer) -> None:
        ok = [False] * len(t.keys)
        client = self._clients().get(t.peer or "")
        try:
            if client is None or client.is_down:
                raise PeerDownError(f"no connection to peer {t.peer!r}")
            views = slot_views(self._cpu_bytes, t.dst_slots, self._bytes_per_block)
            result = await client.pull(t.keys, views)
            ok[: result.num_blocks] = [True] * result.num_blocks
        except PeerRequestError:  # refused this pull (busy, fingerprint): a miss
            pass
        except Exception:  # down, stalled, malformed: forget its hints
            if t.peer is not None:
                self._directory.mark_down(t.peer)
        finally:
            self._report(t, ok)  # (not again if `close` gave it up)

    def close(self) -> None:
        """Give up the pulls in flight: each is reported failed now (the store is being
        drained at shutdown, so nothing reuses their slots)."""
        self._give_up_running()
