"""Per-block records of a persistent slab, and rebuilding the disk tier's index from them.

A persistent slab (`kv.disk.persist`, format version 2 in `kvflow.kv.slab`) holds one
`RECORD_BYTES` record per block right after the header, block `slot`'s at
`HEADER_BYTES + slot * RECORD_BYTES`:

| offset | size | field |
| --- | --- | --- |
| 0 | 8 | block key (u64) |
| 8 | 8 | xxh3-64 of the block's bytes |
| 16 | 6 | generation: 1, 2, ... in write order across runs; 0 = no block |
| 22 | 2 | depth: the block's index in its chain (root 0, saturating at 65535) |
| 24 | 8 | xxh3-64 of bytes 0..24, seeded with the slab's model fingerprint |

Little-endian (bytes 16..24 read as one u64: generation in its low 48 bits, depth in
its top 16). A slab written before depths were recorded reads as depth 0 everywhere
(unknown, taken as a root); so does a block whose depth was unknown when written. A
block's record is written after its bytes (and, with `kv.disk.fsync`,
after they were synced), and the block is indexed only once both writes returned: a
crash mid-write leaves a record that fails its own checksum (torn) or the data checksum
(the bytes changed under an old record), never a record that vouches for bad bytes. At
start, `recover` keeps the newest good record of each key; the rest are cleared. The
blocks it keeps enter the disk tier's LRU deepest first, then oldest first: once the
tier fills, every chain loses its tail before its root (as a radix cache evicts its
leaves first), never leaving a tail that no prefix match can reach.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from kvflow.kv.block_pool import MAX_DEPTH
from kvflow.kv.slab import HEADER_BYTES, RECORD_BYTES

if TYPE_CHECKING:
    from kvflow.kv.slab import SlabLayout

_RECORD = struct.Struct("<QQQQ")
_BODY = struct.Struct("<QQQ")
assert _RECORD.size == RECORD_BYTES
_DEPTH_SHIFT = 48
_GENERATION_MASK = (1 << _DEPTH_SHIFT) - 1


def record_offset(slot: int) -> int:
    return HEADER_BYTES + slot * RECORD_BYTES


def pack_record(
    fingerprint: bytes, key: int, digest: int, generation: int, depth: int = 0
) -> bytes:
    """The record of block `key` (`depth`: its index in its chain, saturated)."""
    stamp = min(depth, MAX_DEPTH) << _DEPTH_SHIFT | generation & _GENERATION_MASK
    body = _BODY.pack(key, digest, stamp)
    return body + struct.pack("<Q", _record_check(fingerprint, body))


def _record_check(fingerprint: bytes, body: bytes) -> int:
    return xxhash.xxh3_64_intdigest(fingerprint + body)


@dataclass(frozen=True, slots=True)
class Recovered:
    """What `recover` found: the good blocks, in the order to evict them (deepest
    first, then oldest), and what it dropped."""

    slots: list[int]
    keys: list[int]
    digests: list[int]
    depths: list[int]
    next_generation: int
    num_dropped: int
    """Blocks whose record was torn, whose bytes are missing (a truncated slab) or
    whose bytes fail the record's checksum."""


def recover(fd: int, layout: SlabLayout, verify: bool) -> Recovered:
    """Read every record of the persistent slab open as `fd`; with `verify`, read and
    checksum each block a record vouches for. Clears the records it does not keep (so a
    dropped block is counted once), and returns the good blocks."""
    assert layout.fingerprint is not None
    fingerprint = layout.fingerprint
    n = layout.num_blocks
    size = layout.bytes_per_block
    file_size = os.fstat(fd).st_size
    raw = os.pread(fd, n * RECORD_BYTES, HEADER_BYTES).ljust(n * RECORD_BYTES, b"\0")
    best: dict[int, tuple[int, int, int, int]] = {}  # key -> (generation, slot, digest, depth)
    clear: list[int] = []
    num_dropped = 0
    max_generation = 0
    buffer = bytearray(size)
    for slot, (key, digest, stamp, check) in enumerate(_RECORD.iter_unpack(raw)):
        if stamp == 0 and check == 0 and key == 0 and digest == 0:
            continue  # never written
        generation = stamp & _GENERATION_MASK
        body = raw[slot * RECORD_BYTES : slot * RECORD_BYTES + _BODY.size]
        start = layout.data_offset + slot * size
        good = (
            generation != 0
            and check == _record_check(fingerprint, body)
            and start + size <= file_size
            and (not verify or _block_digest(fd, buffer, start) == digest)
        )
        if not good:
            num_dropped += 1
            clear.append(slot)
            continue
        max_generation = max(max_generation, generation)
        held = best.get(key)
        if held is not None:  # the key twice: keep the newer copy
            clear.append(held[1] if held[0] < generation else slot)
            if held[0] >= generation:
                continue
        best[key] = (generation, slot, digest, stamp >> _DEPTH_SHIFT)
    for slot in clear:
        os.pwrite(fd, bytes(RECORD_BYTES), record_offset(slot))
    kept = sorted((-depth, g, slot, key, digest) for key, (g, slot, digest, depth) in best.items())
    return Recovered(
        slots=[slot for _, _, slot, _, _ in kept],
        keys=[key for _, _, _, key, _ in kept],
        digests=[digest for _, _, _, _, digest in kept],
        depths=[-depth for depth, _, _, _, _ in kept],
        next_generation=max_generation + 1,
        num_dropped=num_dropped,
    )


def _block_digest(fd: int, buffer: bytearray, start: int) -> int | None:
    try:
        num_read = os.preadv(fd, [buffer], start)
    except OSError:
        return None
    if num_read != len(buffer):
        return None
    return xxhash.xxh3_64_intdigest(buffer)
