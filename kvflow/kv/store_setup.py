"""Building a `KVStore`: what a store refuses before it allocates anything, and the real
tensor pools, slab file and threaded copy engine of `KVStore.with_tensors`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kvflow.config import ConfigError, KVConfig
from kvflow.kv.block_pool import BlockPool
from kvflow.kv.capacity import check_bookkeeping, check_tensors
from kvflow.kv.slab import SlabLayout, check_slab_path
from kvflow.kv.store_stats import StoreStats
from kvflow.kv.transfer import CopyEngine

if TYPE_CHECKING:
    import torch

    from kvflow.kv.storage import DiskStorage, TensorStorage


class TensorTiers(NamedTuple):
    """Real bytes for every configured tier and the engine that copies between them."""

    engine: CopyEngine
    device_storage: TensorStorage
    cpu_storage: TensorStorage | None
    disk_storage: DiskStorage | None


def check_store_config(
    config: KVConfig, device_storage: TensorStorage | None, disk_storage: DiskStorage | None
) -> None:
    """Refuse what a store with these storages would not run (see `KVStore`'s Raises)."""
    num_cpu = config.tier_blocks("cpu")
    num_disk = config.tier_blocks("disk")
    if device_storage is None:  # with_tensors checked it with the tensors
        check_bookkeeping(config)  # before the pools allocate it
    if disk_storage is None and num_disk and num_cpu and config.disk.persist:
        raise ConfigError(
            "kv.disk.persist=true: the simulator writes no slab, so nothing would "
            "persist; set kv.disk.persist=false for a simulated run"
        )
    if disk_storage is None and num_disk and num_cpu and config.disk.path is not None:
        # No slab here (the simulator), but the path must be one a real store would
        # accept: a run is refused alike whether or not it writes the file.
        check_slab_path(Path(config.disk.path).expanduser(), SlabLayout.of(config, num_disk))


def allocate_tensor_tiers(
    config: KVConfig, device: str | torch.device, max_workers: int, model_id: str
) -> TensorTiers:
    """The tiers of `KVStore.with_tensors` (see its Raises)."""
    from kvflow.kv.storage import DiskStorage, TensorStorage
    from kvflow.kv.tensor_copy import TensorCopyEngine

    check_tensors(config, device)
    num_cpu = config.tier_blocks("cpu")
    num_disk = config.tier_blocks("disk")
    # The slab first: a refused kv.disk.path fails before any tensor is allocated.
    disk = DiskStorage.create(config, num_disk, model_id) if num_disk and num_cpu else None
    try:
        dev = TensorStorage.allocate(config, config.tier_blocks("device"), device)
        cpu = TensorStorage.allocate(config, num_cpu, "cpu", pin=True) if num_cpu else None
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    engine = TensorCopyEngine(dev, cpu, disk, max_workers=max_workers)
    return TensorTiers(engine, dev, cpu, disk)


def adopt_recovered(storage: DiskStorage, pool: BlockPool, stats: StoreStats) -> None:
    """Index what a persistent slab held at start as cached disk blocks. No listener
    is attached yet: peers learn these keys from the snapshot (`held_keys`) every
    subscriber gets first, as they learn any key held before they connected."""
    recovered = storage.recovered
    pool.adopt(recovered.slots, recovered.keys, recovered.depths)
    stats.num_disk_blocks_recovered = len(recovered.slots)
    stats.num_disk_blocks_dropped = recovered.num_dropped
