"""Per-block records of a persistent slab, and rebuilding the disk tier's index from them.

A persistent slab (`kv.disk.persist`, format version 2 in `kvflow.kv.slab`) holds one
`RECORD_BYTES` record per block right after the header, block `slot`'s at
`HEADER_BYTES + slot * RECORD_BYTES`:

| offset | size | field |
| --- | --- | --- |
| 0 | 8 | block key (u64) |
| 8 | 8 | xxh3-64 of the block's bytes |
| 16 | 8 | generation: 1, 2, ... in write order across runs; 0 = no block |
| 24 | 8 | xxh3-64 of bytes 0..24, seeded with the slab's model fingerprint |

Little-endian. A block's record is written after its bytes (and, with `kv.disk.fsync`,
after they were synced), and the block is indexed only once both writes returned: a
crash mid-write leaves a record that fails its own checksum (torn) or the data checksum
(the bytes changed under an old record), never a record that vouches for bad bytes. At
start, `recover` keeps the newest good record of each key; the rest are cleared.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from kvflow.kv.slab import HEADER_BYTES, RECORD_BYTES

if TYPE_CHECKING:
    from kvflow.kv.slab import SlabLayout

_RECORD = struct.Struct("<QQQQ")
_BODY = struct.Struct("<QQQ")
assert _RECORD.size == RECORD_BYTES


def record_offset(slot: int) -> int:
    return HEADER_BYTES + slot * RECORD_BYTES


def pack_record(fingerprint: bytes, key: int, digest: int, generation: int) -> bytes:
    body = _BODY.pack(key, digest, generation)
    return body + struct.pack("<Q", _record_check(fingerprint, body))


def _record_check(fingerprint: bytes, body: bytes) -> int:
    return xxhash.xxh3_64_intdigest(fingerprint + body)


@dataclass(frozen=True, slots=True)
class Recovered:
    """What `recover` found: the good blocks, oldest first, and what it dropped."""

    slots: list[int]
    keys: list[int]
    digests: list[int]
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
    best: dict[int, tuple[int, int, int]] = {}  # key -> (generation, slot, digest)
    clear: list[int] = []
    num_dropped = 0
    max_generation = 0
    buffer = bytearray(size)
    for slot, (key, digest, generation, check) in enumerate(_RECORD.iter_unpack(raw)):
        if generation == 0 and check == 0 and key == 0 and digest == 0:
            continue  # never written
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
        best[key] = (generation, slot, digest)
    for slot in clear:
        os.pwrite(fd, bytes(RECORD_BYTES), record_offset(slot))
    kept = sorted((g, slot, key, digest) for key, (g, slot, digest) in best.items())
    return Recovered(
        slots=[slot for _, slot, _, _ in kept],
        keys=[key for _, _, key, _ in kept],
        digests=[digest for _, _, _, digest in kept],
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
