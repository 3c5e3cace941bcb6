"""Builders for peer tests: stores with real tensors holding known blocks in chosen tiers."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import torch

from kvflow.config import KVConfig, KVFlowConfig, PeerConfig
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore, TierName
from kvflow.peer.frames import FrameKind, Header, blocks_meta_size, pack_blocks_head, pack_header
from kvflow.peer.handshake import server_handshake
from kvflow.peer.identity import PeerIdentity
from kvflow.peer.wire import Wire

BLOCK_SIZE = 4
LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float64"}


def kv_config(tmp_path: Path, name: str = "a", num_blocks: int = 64, **layout: Any) -> KVConfig:
    return KVFlowConfig.from_dict(
        {
            "kv": {
                "block_size": BLOCK_SIZE,
                "layout": {**LAYOUT, **layout},
                "device": {"num_blocks": num_blocks},
                "cpu": {"num_blocks": num_blocks},
                "disk": {"num_blocks": num_blocks, "path": str(tmp_path / f"{name}.slab")},
            }
        }
    ).kv


def peer_config(**settings: Any) -> PeerConfig:
    return PeerConfig(**{"pull_timeout_s": 5.0, "event_interval_s": 0.01, **settings})


def make_store(tmp_path: Path, name: str = "a", num_blocks: int = 64, **layout: Any) -> KVStore:
    return KVStore.with_tensors(kv_config(tmp_path, name, num_blocks, **layout))


def put_blocks(
    store: KVStore, tier: TierName, keys: list[int], seed: int = 0
) -> dict[int, torch.Tensor]:
    """Cache blocks with random contents under `keys` in `tier` (unreferenced, so
    evictable). Returns each key's block contents."""
    pool = store._pool(tier)
    slots = pool.allocate(len(keys))
    shape = store.device_storage.data.shape[1:]  # type: ignore[union-attr]
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn((len(keys), *shape), generator=gen, dtype=torch.float64)
    if tier == "disk":
        disk = store.disk_storage
        assert disk is not None
        ok = disk.write_from(byte_view(blocks), list(range(len(keys))), slots)
        assert all(ok)
    else:
        storage = store.device_storage if tier == "device" else store.cpu_storage
        assert storage is not None
        storage.data[slots] = blocks
    pool.seal_many(slots, keys)
    pool.release(slots)
    return {k: blocks[i].clone() for i, k in enumerate(keys)}


def cpu_block(store: KVStore, key: int) -> torch.Tensor:
    """The contents of the block `key` in `store`'s cpu tier."""
    assert store.cpu is not None and store.cpu_storage is not None
    slot = store.cpu.lookup(key)
    assert slot is not None, f"key {key} is not in the cpu tier"
    return store.cpu_storage.data[slot]


def no_pins(store: KVStore) -> bool:
    """Nothing holds a reference on any block of any tier, and the store agrees."""
    store.check_integrity()
    pools = [p for p in (store.device, store.cpu, store.disk) if p is not None]
    return all(int(p.ref_counts.sum()) == 0 for p in pools) and not any(store.export_pins.values())


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds (the caller bounds it with `anyio.fail_after`)."""
    while not condition():  # noqa: ASYNC110 - the conditions are other tasks' state
        await anyio.sleep(0.005)


async def answer_one_pull(
    listener: socket.socket,
    identity: PeerIdentity,
    config: PeerConfig,
    answer: Callable[[Wire, Header], Awaitable[None]],
) -> None:
    """A fake peer on `listener` (non-blocking): accepts one connection, shakes hands as
    `identity`, reads one PULL, lets `answer(wire, pull)` reply, then stays silent (the
    caller cancels it)."""
    await anyio.wait_readable(listener)
    sock, _ = listener.accept()
    wire = Wire(sock, config.max_frame_bytes)
    await server_handshake(wire, identity, config)
    pull = await wire.read_header()
    await wire.read_exact(pull.payload_length)
    await answer(wire, pull)
    await anyio.sleep(60)


def blocks_head(request_id: int, size: int, n: int, payload_length: int | None = None) -> bytes:
    """The header and meta of a BLOCKS reply to pull `request_id` (its lease id too):
    `n` blocks of `size` bytes from cpu, the payload `payload_length` long (by default,
    as long as they make it); the blocks and checksums are the caller's to send."""
    length = blocks_meta_size(n) + n * size if payload_length is None else payload_length
    head = pack_header(FrameKind.BLOCKS, request_id, length)
    return head + pack_blocks_head(request_id, size, ["cpu"] * n)
