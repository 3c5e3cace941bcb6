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
_NEEDS_BYTESWAP = sys.byteorder != "little"


def root_key(extra_keys: Sequence[str] = ()) -> int:
    """The parent key of a request's first block."""
    payload = "\x1f".join(extra_keys).encode()
    return xxhash.xxh3_64_intdigest(payload, seed=_ROOT_SEED)


def _pack(token_ids: Sequence[int]) -> bytes:
    if isinstance(token_ids, array) and token_ids.typecode == "I" and not _NEEDS_BYTESWAP:
        return token_ids.tobytes()  # `RequestState.token_ids`: one memcpy
    packed = array("I", token_ids)
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent_key: int, token_ids: Sequence[int]) -> int:
    """Key of one full block."""
    return xxhash.xxh3_64_intdigest(_pack(token_ids), seed=parent_key)


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
    # Packing all of a prompt beats slicing it first (a slice copies every reference);
    # the few tokens past the last full block are never read.
    if first == 0 and len(token_ids) - end <= block_size:
        packed = _pack(token_ids)
    else:
        packed = _pack(token_ids[first:end])
    _chain(keys, packed, 0, num_full_blocks - start, 4 * block_size, keys[-1] if keys else root)


def _chain(keys: list[int], packed: bytes, begin: int, end: int, width: int, parent: int) -> None:
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


class ChainMemo:
    """Key chains of recent prompts, found by any of their keys where a walk stopped.

    Prompts often start alike (a system prompt, then the earlier turns of one
    conversation). A new prompt hashes its first block and looks the key up: a recent
    chain with that key has the same tokens up to there, so the two are compared byte
    by byte (a few memcmp calls) and the keys of every whole block they share are
    copied. At the block where they part, the new prompt hashes that block and looks
    again (another conversation's chain may go on from there), until a key is unknown;
    the rest is hashed. The keys are the ones hashing would give: equal tokens under
    equal parents have equal keys. A chain is registered under the keys its walk looked
    up, and a chain it parted from under the key where they parted.
    """

    def __init__(self, block_size: int, max_chains: int = 1024) -> None:
        self.block_size = block_size
        self.max_chains = max_chains
        self._chains: dict[int, tuple[bytes, list[int]]] = {}
        self.num_reused_keys = 0

    def extend(
        self, keys: list[int], token_ids: Sequence[int], num_full_blocks: int, root: int
    ) -> None:
        """`extend_block_keys`, reusing recent chains for a new prompt's blocks."""
        bs = self.block_size
        if keys or num_full_blocks <= 1 or len(token_ids) - num_full_blocks * bs > bs:
            extend_block_keys(keys, token_ids, num_full_blocks, bs, root)
            return
        packed = _pack(token_ids)
        width = 4 * bs
        chains = self._chains
        looked_up: list[int] = []
        parent = root
        pos = 0  # blocks whose keys are known
        while pos < num_full_blocks:
            key = xxhash.xxh3_64_intdigest(packed[pos * width : (pos + 1) * width], parent)
            keys.append(key)
            looked_up.append(key)
            pos += 1
            found = chains.pop(key, None)
            if found is None:
                break
            other_packed, other_keys = found
            if len(other_keys) < pos or other_keys[pos - 1] != key:
                break  # registered for a key at another depth (cannot happen but by collision)
            limit = min(len(other_keys), len(other_packed) // width)
            common = _common_blocks(packed, other_packed, width, min(num_full_blocks, limit), pos)
            keys += other_keys[pos:common]
            self.num_reused_keys += common - pos
            if common < limit:  # it goes on elsewhere: keep it findable from where we part
                chains[other_keys[common]] = found
            pos = common
            parent = keys[-1]
        _chain(keys, packed, pos, num_full_blocks, width, keys[-1])
        for key in looked_up:
            chains[key] = (packed, keys)  # the newest, at the back
        while len(chains) > self.max_chains:
            del chains[next(iter(chains))]


def _common_blocks(a: bytes, b: bytes, width: int, limit: int, start: int = 0) -> int:
    """How many leading `width`-byte blocks, at most `limit`, `a` and `b` share, given
    that they share the first `start`."""
    view = memoryview(b)
    offset = start * width
    if a.startswith(view[offset : limit * width], offset):
        return limit
    lo, hi = start, limit - 1  # the answer is in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(view[offset : mid * width], offset):
            lo = mid
        else:
            hi = mid - 1
    return lo
