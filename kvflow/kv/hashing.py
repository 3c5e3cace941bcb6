"""Stable block keys.

A full block's key is xxh3-64 of its token ids (packed as little-endian uint32),
seeded with its parent's key; the first block's parent is a root key derived from
the request's extra keys (model, adapter, ...). Keys are identical across processes,
machines and Python versions (no `hash()`), so peers agree on them.
"""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

_ROOT_SEED = 0x6B76666C6F77  # "kvflow"
NEEDS_BYTESWAP = sys.byteorder != "little"


def root_key(extra_keys: Sequence[str] = ()) -> int:
    """The parent key of a request's first block."""
    payload = "\x1f".join(extra_keys).encode()
    return xxhash.xxh3_64_intdigest(payload, seed=_ROOT_SEED)


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes, the payload a block key hashes."""
    if isinstance(token_ids, array) and token_ids.typecode == "I" and not NEEDS_BYTESWAP:
        return token_ids.tobytes()  # `RequestState.token_ids`: one memcpy
    packed = array("I", token_ids)
    if NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent_key: int, token_ids: Sequence[int]) -> int:
    """Key of one full block."""
    return xxhash.xxh3_64_intdigest(pack_tokens(token_ids), seed=parent_key)


def extend_block_keys(
    keys: list[int],
    token_ids: Sequence[int],
    num_full_blocks: int,
    block_size: int,
    root: int,
) -> None:
    """Append the keys of blocks `len(keys) .. num_full_blocks - 1` of `token_ids` to `keys`."""
    start = len(keys)
    if start >= num_full_blocks:
        return
    first = start * block_size
    end = num_full_blocks * block_size
    parent = keys[-1] if keys else root
    if num_full_blocks - start == 1:  # a decode filled a block: hash it directly
        keys.append(hash_block(parent, token_ids[first:end]))
        return
    # Packing all of a prompt beats slicing it first (a slice copies every reference);
    # the few tokens past the last full block are never read.
    if first == 0 and len(token_ids) - end <= block_size:
        packed = pack_tokens(token_ids)
    else:
        packed = pack_tokens(token_ids[first:end])
    chain_keys(keys, packed, 0, num_full_blocks - start, 4 * block_size, parent)


def chain_keys(
    keys: list[int], packed: bytes | memoryview, begin: int, end: int, width: int, parent: int
) -> None:
    """Append to `keys` the chained keys of blocks `begin..end-1` of `packed` (`width`
    bytes each), the first seeded with `parent`."""
    digest = xxhash.xxh3_64_intdigest
    append = keys.append
    # struct's iter_unpack cuts the blocks in C: ~40% faster than slicing in Python.
    for (block,) in _block_struct(width).iter_unpack(
        memoryview(packed)[begin * width : end * width]
    ):
        parent = digest(block, parent)  # seeded with the parent's key
        append(parent)


@functools.cache
def _block_struct(width: int) -> struct.Struct:
    return struct.Struct(f"{width}s")
