"""Which tier below device holds a run of keys, for `KVStore.locate` and admission:
`find_below` over the cpu and disk pools' key indexes and `find_remote` over the
remote tier's hints."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.kv.block_pool import BlockPool
from kvflow.kv.location import TierName
from kvflow.kv.remote import RemoteRun, RemoteTier


def find_below(
    cpu: BlockPool,
    disk: BlockPool | None,
    block_keys: Sequence[int],
    start: int,
    stop: int,
    slots: list[tuple[TierName, int]] | None = None,
) -> tuple[int, int]:
    """Walk the run of blocks `start..` (short of `stop`) that cpu and disk hold, each
    block from the fastest tier holding it: how many come from cpu and how many from
    disk. With `slots`, each block's (tier, slot) is appended to it; `KVStore.locate`
    only counts (a list per lookup cost it 0.27% more instructions over a replay)."""
    cpu_index = cpu._cached
    disk_index = disk._cached if disk is not None else {}
    num_cpu = num_disk = 0
    for i in range(start, min(stop, len(block_keys))):
        key = block_keys[i]
        slot = cpu_index.get(key)
        if slot is not None:
            num_cpu += 1
            if slots is not None:
                slots.append(("cpu", slot))
            continue
        slot = disk_index.get(key)
        if slot is None:
            break
        num_disk += 1
        if slots is not None:
            slots.append(("disk", slot))
    return num_cpu, num_disk


def find_remote(
    remote: RemoteTier | None,
    cpu: BlockPool | None,
    block_keys: Sequence[int],
    start: int,
    max_blocks: int,
) -> RemoteRun | None:
    """The run of blocks `start..` (at most up to `max_blocks`) a peer holds by the
    remote tier's hints, capped at what the cpu tier can take in now."""
    if remote is None or cpu is None or start >= min(max_blocks, len(block_keys)):
        return None
    run = remote.longest_run(block_keys[:max_blocks], start)
    if run is None:
        return None
    n = min(run.num_blocks, cpu.num_free_blocks)
    return run._replace(num_blocks=n) if n > 0 else None
