"""Builders for tests of the persistent disk tier: a tiny float64 layout, and blocks
whose contents follow from their keys (so another process can check them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvflow.config import KVConfig, KVFlowConfig
from kvflow.kv.store import KVStore

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float64"}
MODEL = "tiny-llama-test"


def kv_config(path: Path, persist: bool = True, **disk: object) -> KVConfig:
    return KVFlowConfig.from_dict(
        {
            "kv": {
                "block_size": 4,
                "device": {"num_blocks": 4},
                "cpu": {"num_blocks": 4},
                "disk": {"num_blocks": 8, "path": str(path), "persist": persist, **disk},
                "layout": LAYOUT,
                "write_policy": "write_through",
            }
        }
    ).kv


def open_store(path: Path, model_id: str = MODEL, **disk: Any) -> KVStore:
    return KVStore.with_tensors(kv_config(path, **disk), model_id=model_id)


def block_data(store: KVStore, key: int) -> torch.Tensor:
    """The contents of the block `key` (random float64, seeded by the key)."""
    assert store.device_storage is not None
    shape = store.device_storage.data.shape[1:]
    return torch.randn(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float64)


def compute_block(store: KVStore, key: int) -> torch.Tensor:
    """Fill a device block with `block_data(key)` as the runner would and seal it
    (write_through copies it down to cpu, then disk); wait for the copies, release it."""
    assert store.device_storage is not None
    (block,) = store.device.allocate(1)
    data = block_data(store, key)
    store.device_storage.data[block].copy_(data)
    assert store.device.seal(block, key)
    store.on_sealed(block, now=0.0)
    store.drain(now=0.0)
    store.release_device([block], now=0.0, keep=True)
    store.drain(now=0.0)
    return data


def compute_blocks(store: KVStore, keys: list[int]) -> dict[int, torch.Tensor]:
    return {key: compute_block(store, key) for key in keys}


def load_from_disk(store: KVStore, key: int) -> torch.Tensor | None:
    """Promote the block `key` from disk into a fresh device block; its bytes, or None
    when the load failed (a miss)."""
    assert store.device_storage is not None
    sources = store.find_below([key], 0, 1)
    assert sources and sources[0][0] == "disk", sources
    (target,) = store.device.allocate(1)
    store.device_storage.data[target].zero_()
    store.start_load(sources, [key], [target], now=1.0)
    store.drain(now=1.0)
    data = store.device_storage.data[target].clone()
    good = store.device.lookup(key) == target
    store.release_device([target], now=1.0, keep=False)
    store.device.reset_prefix_cache()
    return data if good else None
