"""The store's side of sharing: block events as keys enter and leave tiers, and pinned
runs that re-validate a hint and survive eviction pressure until unpinned."""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash

from kvflow.config import TransferConfig
from kvflow.kv.export import RunReader, find_run, held_keys, pin_run, unpin
from kvflow.kv.store import BlockEvent
from kvflow.kv.transfer import PEER_DIRECTION, SimCopyEngine
from tests.peer_builders import make_store, no_pins, put_blocks


def test_events_follow_a_block_down_the_tiers_and_out(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=4)
    events: list[BlockEvent] = []
    store.add_listener(events.append)
    blocks = store.device.allocate(2)
    store.device.seal_many(blocks, [11, 12])
    store.release_device(blocks, now=0.0, keep=True)  # write_back: copied down to cpu
    store.drain(0.0)
    assert store.disk is not None
    store.disk.reset_prefix_cache()

    def keys(kind: str, tier: str) -> set[int]:
        return {k for e in events if (e.kind, e.tier) == (kind, tier) for k in e.keys}

    assert (events[0].kind, events[0].tier, set(events[0].keys)) == ("stored", "device", {11, 12})
    assert keys("stored", "cpu") == {11, 12}
    assert keys("stored", "disk") == keys("dropped", "disk") == {11, 12}
    assert keys("dropped", "device") == keys("dropped", "cpu") == set()
    assert held_keys(store)["device"].tolist() == [11, 12]
    assert held_keys(store)["disk"].tolist() == []
    store.close()


def test_a_pinned_run_stops_at_the_first_missing_key_and_resists_eviction(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path, num_blocks=4)
    put_blocks(store, "cpu", [1, 2])
    put_blocks(store, "disk", [3], seed=1)
    run = pin_run(store, [1, 2, 3, 9, 4])
    assert (run.keys, run.tiers) == ((1, 2, 3), ("cpu", "cpu", "disk"))
    assert store.cpu is not None
    assert store.cpu.num_free_blocks == 2  # the pinned two cannot be evicted
    store.check_integrity()
    reader = RunReader(store)
    assert not reader.in_host_memory(run)  # the disk block is read, not viewed
    cpu_only = pin_run(store, [1, 2])
    assert reader.in_host_memory(cpu_only)
    unpin(store, cpu_only)
    data = reader.read_run(run)
    assert len(data.views) == 3
    assert data.checksums == [xxhash.xxh3_64_intdigest(v) for v in data.views]
    unpin(store, run)
    assert no_pins(store) and store.cpu.num_free_blocks == 4
    store.close()


def test_a_run_takes_each_block_from_the_fastest_tier_holding_it(tmp_path: Path) -> None:
    """Whole runs in one tier, and runs whose blocks a faster tier holds only some of."""
    store = make_store(tmp_path, num_blocks=8)
    put_blocks(store, "cpu", [1, 2, 3, 4])
    put_blocks(store, "device", [3], seed=1)
    put_blocks(store, "disk", [5], seed=2)
    assert find_run(store, [1, 2]).tiers == ("cpu", "cpu")
    assert find_run(store, [3]).tiers == ("device",)
    assert find_run(store, [1, 2, 3, 4, 5]).tiers == ("cpu", "cpu", "device", "cpu", "disk")
    assert find_run(store, [5, 1]).tiers == ("disk", "cpu")
    run = find_run(store, [4, 3, 9, 1])
    assert (run.keys, run.tiers) == ((4, 3), ("cpu", "device"))
    assert run.slots == (store.cpu.lookup(4), store.device.lookup(3))  # type: ignore[union-attr]
    assert len(find_run(store, [9, 1])) == len(find_run(store, [])) == 0
    store.close()


def test_a_remembered_checksum_lasts_as_long_as_its_block_stays_in_its_slot(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path, num_blocks=2)
    put_blocks(store, "cpu", [1, 2], seed=1)
    reader = RunReader(store)
    run = find_run(store, [1, 2])
    first = reader.read_run(run, hash_host=False)
    assert first.checksums == [None, None]  # never hashed yet: the sender hashes them
    sums = [xxhash.xxh3_64_intdigest(v) for v in first.views]
    reader.remember(run, 0, sums[0])
    assert reader.read_run(find_run(store, [1, 2]), hash_host=False).checksums == [sums[0], None]
    assert reader.read_run(run).checksums == sums  # hash_host: the rest are hashed
    reader.remember(run, 1, sums[1])
    whole = reader.read_run(find_run(store, [1, 2]), hash_host=False)  # all known
    assert whole.checksums == sums
    assert [bytes(v) for v in whole.views] == [bytes(v) for v in first.views]
    assert store.cpu is not None
    store.cpu.reset_prefix_cache()  # both evicted; their slots take other blocks
    put_blocks(store, "cpu", [3, 4], seed=2)
    again = find_run(store, [3, 4])
    assert set(again.slots) == set(run.slots)
    data = reader.read_run(again, hash_host=False)
    assert data.checksums == [None, None]  # nothing remembered of the old blocks
    assert reader.read_run(again).checksums == [xxhash.xxh3_64_intdigest(v) for v in data.views]
    store.close()


def test_a_store_without_tensors_has_nothing_to_serve() -> None:
    from kvflow.kv.store import KVStore
    from tests.builders import make_config

    with pytest.raises(ValueError, match="without tensors"):
        RunReader(KVStore(make_config().kv))


def test_the_copy_model_prices_a_peer_pull() -> None:
    engine = SimCopyEngine(TransferConfig(peer_gbps=2.0, peer_latency_us=100.0))
    assert engine.duration_s(PEER_DIRECTION, 2 * 10**9) == pytest.approx(1.0001)
