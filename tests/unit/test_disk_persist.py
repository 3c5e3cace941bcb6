"""A persistent disk tier (`kv.disk.persist`): blocks written in one run are found, byte
for byte, by the next; what a crash or damage left behind is dropped and counted, never
served."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
import xxhash

from kvflow.config import ConfigError, KVFlowConfig
from kvflow.kv.fingerprint import model_fingerprint
from kvflow.kv.persist import record_offset
from kvflow.kv.slab import HEADER_BYTES, PERSISTENT_VERSION, RECORD_BYTES, read_layout
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore
from tests.disk_builders import MODEL, compute_blocks, kv_config, load_from_disk, open_store


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_blocks_written_in_one_run_are_disk_hits_in_the_next_byte_for_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    written = compute_blocks(first, [11, 22, 33])
    assert first.disk is not None and first.disk.num_cached_blocks == 3
    first.close()
    assert path.exists()  # created by this run, but persistent: kept

    second = open_store(path)
    assert second.stats.num_disk_blocks_recovered == 3
    assert second.stats.num_disk_blocks_dropped == 0
    loc = second.locate([11, 22, 33, 44])
    assert (loc.device_tokens, loc.cpu_tokens, loc.disk_tokens) == (0, 0, 12)
    for key, data in written.items():
        back = load_from_disk(second, key)
        assert back is not None and torch.equal(back, data)
    assert second.stats.num_tier_errors == 0
    second.check_integrity([0] * second.device.num_blocks)
    second.close()


def test_recovered_blocks_are_evictable_and_new_writes_survive_the_next_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    compute_blocks(first, list(range(1, 9)))  # fills all 8 disk blocks
    first.close()
    second = open_store(path)
    assert second.stats.num_disk_blocks_recovered == 8
    newer = compute_blocks(second, [100, 200])  # evicts the two oldest
    assert second.disk is not None
    assert second.disk.lookup(1) is None and second.disk.lookup(2) is None
    second.close()
    third = open_store(path)
    assert third.stats.num_disk_blocks_recovered == 8
    assert third.stats.num_disk_blocks_dropped == 0
    assert third.locate([100, 200]).disk_tokens == 8
    assert third.locate([1]).total_tokens == 0
    for key, data in newer.items():
        back = load_from_disk(third, key)
        assert back is not None and torch.equal(back, data)
    third.close()


@pytest.mark.parametrize("where", ["data", "record"])
def test_a_corrupted_block_is_dropped_and_counted_and_the_others_survive(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    written = compute_blocks(first, [11, 22, 33])
    assert first.disk is not None and first.disk_storage is not None
    slot = first.disk.lookup(22)
    assert slot is not None
    offset = first.disk_storage.block_offset(slot) + 5
    first.close()
    flip_byte(path, offset if where == "data" else record_offset(slot) + 3)

    second = open_store(path)
    assert second.stats.num_disk_blocks_recovered == 2
    assert second.stats.num_disk_blocks_dropped == 1
    assert second.locate([22]).total_tokens == 0
    for key in (11, 33):
        back = load_from_disk(second, key)
        assert back is not None and torch.equal(back, written[key])
    second.close()
    third = open_store(path)  # the dropped record was cleared: counted once
    assert (third.stats.num_disk_blocks_recovered, third.stats.num_disk_blocks_dropped) == (2, 0)
    third.close()


def test_without_verify_on_start_bad_data_is_a_miss_at_its_first_read(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    written = compute_blocks(first, [11, 22])
    assert first.disk is not None and first.disk_storage is not None
    slot = first.disk.lookup(22)
    assert slot is not None
    offset = first.disk_storage.block_offset(slot)
    first.close()
    flip_byte(path, offset)

    second = open_store(path, verify_on_start=False)
    assert second.stats.num_disk_blocks_recovered == 2  # not read: not known to be bad
    assert load_from_disk(second, 22) is None
    assert second.stats.num_tier_errors == 1
    assert second.locate([22]).total_tokens == 0  # forgotten after the failed read
    back = load_from_disk(second, 11)
    assert back is not None and torch.equal(back, written[11])
    second.close()


def test_a_truncated_slab_keeps_the_blocks_before_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    written = compute_blocks(first, [11, 22, 33])
    assert first.disk is not None and first.disk_storage is not None
    slots = {key: first.disk.lookup(key) for key in written}
    cut_slot = sorted(s for s in slots.values() if s is not None)[1]
    cut = first.disk_storage.block_offset(cut_slot) + 10
    first.close()
    os.truncate(path, cut)

    second = open_store(path, verify_on_start=False)  # the size alone tells
    kept = [key for key, slot in slots.items() if slot is not None and slot < cut_slot]
    assert second.stats.num_disk_blocks_recovered == len(kept) == 1
    assert second.stats.num_disk_blocks_dropped == 2
    back = load_from_disk(second, kept[0])
    assert back is not None and torch.equal(back, written[kept[0]])
    second.close()
    assert path.stat().st_size == second.disk_storage.layout.file_bytes  # type: ignore[union-attr]


def test_a_persistent_slab_of_another_model_or_layout_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    first = open_store(path)
    compute_blocks(first, [11])
    first.close()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="another layout") as err:
        open_store(path, model_id="another-model")
    message = str(err.value)
    config = kv_config(path)
    ours = model_fingerprint(config, MODEL, PERSISTENT_VERSION).hex()
    theirs = model_fingerprint(config, "another-model", PERSISTENT_VERSION).hex()
    assert ours in message and theirs in message and "remove it yourself" in message
    with pytest.raises(ConfigError, match="another layout"):
        KVStore.with_tensors(kv_config(path, persist=False))  # a non-persistent run too
    assert path.read_bytes() == before

    plain = tmp_path / "plain.slab"
    left = KVStore.with_tensors(kv_config(plain, persist=False))
    assert left.disk_storage is not None
    left.engine.close()
    left.disk_storage.close(remove=False)  # a version 1 slab left behind
    with pytest.raises(ConfigError, match="another layout"):
        open_store(plain)  # persistence never adopts a slab that kept no records


def test_the_header_says_persistent_and_records_precede_page_aligned_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    store = open_store(path)
    disk = store.disk_storage
    assert disk is not None
    header = path.read_bytes()[:HEADER_BYTES]
    layout = read_layout(header)
    assert layout == disk.layout and disk.layout.persistent
    assert int.from_bytes(header[8:12], "little") == PERSISTENT_VERSION
    assert int.from_bytes(header[20:24], "little") == RECORD_BYTES
    assert disk.data_offset == HEADER_BYTES + 4096  # 8 records round up to a page
    store.close()


def test_persist_needs_a_path_and_a_model_identity(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kv\.disk\.persist=true needs kv\.disk\.path"):
        KVFlowConfig.from_dict({"kv": {"cpu": {"num_blocks": 1}, "disk": {"persist": True}}})
    with pytest.raises(ConfigError, match=r"peer\.model_id"):
        open_store(tmp_path / "kv.slab", model_id="")
    assert not (tmp_path / "kv.slab").exists()


def test_without_persist_a_created_slab_is_still_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = KVStore.with_tensors(kv_config(path, persist=False))
    compute_blocks(store, [11])
    assert store.disk_storage is not None and not store.disk_storage.layout.persistent
    store.close()
    assert not path.exists()


def test_the_simulator_refuses_persist_rather_than_pretend(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the simulator writes no slab"):
        KVStore(kv_config(tmp_path / "kv.slab"))
    assert not (tmp_path / "kv.slab").exists()


def test_a_direct_write_without_keys_is_readable_now_but_not_recovered(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = open_store(path)
    disk = store.disk_storage
    assert disk is not None
    block = torch.arange(disk.bytes_per_block // 8, dtype=torch.float64)
    assert disk.write_from(byte_view(block), [0], [3]) == [True]
    back = torch.zeros_like(block)
    assert disk.read_into([3], byte_view(back), [0]) == [True]
    assert disk.write_from(byte_view(block), [0], [4], keys=[77]) == [True]
    store.close()
    again = open_store(path)
    assert again.disk is not None
    assert again.stats.num_disk_blocks_recovered == 1 and again.disk.lookup(77) == 4
    again.close()


def test_a_crash_between_a_blocks_bytes_and_its_record_drops_that_block(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = open_store(path)
    written = compute_blocks(store, [11, 22])
    disk, pool = store.disk_storage, store.disk
    assert disk is not None and pool is not None
    slot = pool.lookup(22)
    assert slot is not None
    # What a crash leaves when a new block's bytes landed over slot 22's and its record
    # did not: the old record (key 22) over other bytes.
    other = torch.full((disk.bytes_per_block // 8,), 3.0, dtype=torch.float64)
    assert disk.write_from(byte_view(other), [0], [slot]) == [True]
    store.close()
    again = open_store(path)
    assert (again.stats.num_disk_blocks_recovered, again.stats.num_disk_blocks_dropped) == (1, 1)
    assert again.locate([22]).total_tokens == 0
    back = load_from_disk(again, 11)
    assert back is not None and torch.equal(back, written[11])
    again.close()


def write_keyed(store: KVStore, blocks: dict[int, tuple[int, int]]) -> None:
    """Write a block to each slot of `blocks` (slot -> (key, depth)), with its record."""
    disk = store.disk_storage
    assert disk is not None
    for slot, (key, depth) in blocks.items():
        data = torch.full((disk.bytes_per_block // 8,), float(key), dtype=torch.float64)
        assert disk.write_from(byte_view(data), [0], [slot], keys=[key], depths=[depth]) == [True]


def test_recovered_blocks_line_up_deepest_first_then_oldest_keeping_their_depths(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    store = open_store(path)
    # Two chains, 10 -> 11 -> 12 and 20 -> 21, written root first; 13 past the cap.
    write_keyed(store, {0: (10, 0), 1: (11, 1), 2: (12, 2), 3: (20, 0), 4: (21, 1)})
    write_keyed(store, {5: (13, 70_000)})
    store.close()
    again = open_store(path)
    disk, pool = again.disk_storage, again.disk
    assert disk is not None and pool is not None
    assert disk.recovered.keys == [13, 12, 11, 21, 10, 20]
    assert disk.recovered.depths == [65535, 2, 1, 1, 0, 0]
    assert pool.depths[[5, 2, 1, 4, 0, 3]].tolist() == disk.recovered.depths
    assert (pool.num_blocks, pool.num_cached_blocks) == (8, 6)
    pool.allocate(2 + 4)  # the two free blocks, then four evicted in line
    held = [pool.lookup(k) is not None for k in (13, 12, 11, 21, 10, 20)]
    assert held == [False, False, False, False, True, True]  # both roots stay
    again.close()


def test_a_slab_written_before_depths_still_recovers_in_write_order(tmp_path: Path) -> None:
    """Records as kvflow wrote them before depths (generation in all 8 bytes) read as
    depth 0, their blocks served byte for byte and lined up oldest first."""
    path = tmp_path / "kv.slab"
    store = open_store(path)
    written = compute_blocks(store, [11, 22, 33])
    disk, pool = store.disk_storage, store.disk
    assert disk is not None and pool is not None and disk.layout.fingerprint is not None
    fingerprint = disk.layout.fingerprint
    for generation, key in enumerate([33, 11, 22], start=1):  # written in this order
        slot = pool.lookup(key)
        digest = disk.checksums[slot] if slot is not None else None
        assert slot is not None and digest is not None
        body = struct.pack("<QQQ", key, digest, generation)
        check = xxhash.xxh3_64_intdigest(fingerprint + body)
        with open(path, "r+b") as f:
            f.seek(record_offset(slot))
            f.write(body + struct.pack("<Q", check))
    store.close()
    again = open_store(path)
    assert again.disk_storage is not None
    recovered = again.disk_storage.recovered
    assert (recovered.keys, recovered.depths) == ([33, 11, 22], [0, 0, 0])
    assert again.stats.num_disk_blocks_dropped == 0
    for key, data in written.items():
        back = load_from_disk(again, key)
        assert back is not None and torch.equal(back, data)
    again.close()
