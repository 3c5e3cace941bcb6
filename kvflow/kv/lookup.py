"""Which tier below device holds a run of keys, for `KVStore.locate`: `count_below`
over the cpu and disk pools' key indexes and `find_remote` over the remote tier's
hints (`KVStore.find_below` lists the tiers and slots block by block)."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.kv.block_pool import BlockPool
from kvflow.kv.remote import RemoteRun, RemoteTier


def count_below(
    cpu: BlockPool, disk: BlockPool | None, keys: Sequence[int], start: int
) -> tuple[int, int]:
    """How many of the run of blocks `start..` cpu and disk hold (each block counted in
    the fastest tier holding it)."""
    cpu_index = cpu._cached
    disk_index = disk._cached if disk is not None else {}
    num_cpu = num_disk = 0
    for i in range(start, len(keys)):
        key = keys[i]
        if key in cpu_index:
            num_cpu += 1
        elif key in disk_index:
            num_disk += 1
        else:
            break
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
