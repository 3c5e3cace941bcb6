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
    parent = keys[-1] if keys else root
    if num_full_blocks - start == 1:  # a decode filled a block: hash it directly
        keys.append(hash_block(parent, token_ids[first:end]))
        return
    # Packing all of a prompt beats slicing it first (a slice copies every reference);
    # the few tokens past the last full block are never read.
    if first == 0 and len(token_ids) - end <= block_size:
        packed = _pack(token_ids)
    else:
        packed = _pack(token_ids[first:end])
    _chain(keys, packed, 0, num_full_blocks - start, 4 * block_size, parent)


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
    """Key chains of recent prompts, by the key of their first block.

    Prompts often start alike (a system prompt, the earlier turns of a conversation).
    A new prompt whose first block matches a recent one's copies that chain's keys for
    every whole block the two have in common, found by comparing bytes (a few memcmp
    calls), and hashes only the blocks after. The keys are the ones hashing would give:
    equal tokens under equal parents have equal keys.
    """

    def __init__(
        self, block_size: int, max_chains: int = 1024, max_bytes: int = 32 * 2**20
    ) -> None:
        self.block_size = block_size
        self.max_chains = max_chains
        self.max_bytes = max_bytes
        """Bound on the packed prompts kept (long prompts are 4 bytes a token)."""
        self._chains: dict[int, tuple[bytes, list[int]]] = {}
        self._num_bytes = 0
        self.num_reused_keys = 0

    def extend(
        self, keys: list[int], token_ids: Sequence[int], num_full_blocks: int, root: int
    ) -> None:
        """`extend_block_keys`, reusing a recent chain for a new prompt's common prefix."""
        bs = self.block_size
        if keys or num_full_blocks <= 1 or len(token_ids) - num_full_blocks * bs > bs:
            extend_block_keys(keys, token_ids, num_full_blocks, bs, root)
            return
        packed = _pack(token_ids)
        width = 4 * bs
        first = xxhash.xxh3_64_intdigest(packed[:width], root)
        recent = self._chains.pop(first, None)
        num_common = 0
        if recent is not None:
            prev_packed, prev_keys = recent
            self._num_bytes -= len(prev_packed)
            limit = min(num_full_blocks, len(prev_keys), len(prev_packed) // width)
            num_common = _common_blocks(packed, prev_packed, width, limit)
            keys += prev_keys[:num_common]
            self.num_reused_keys += num_common
        if not num_common:
            keys.append(first)
            num_common = 1
        _chain(keys, packed, num_common, num_full_blocks, width, keys[-1])
        chains = self._chains
        chains[first] = (packed, keys)  # the newest chain, at the back
        self._num_bytes += len(packed)
        while len(chains) > self.max_chains or (self._num_bytes > self.max_bytes and chains):
            self._num_bytes -= len(chains.pop(next(iter(chains)))[0])


def _common_blocks(a: bytes, b: bytes, width: int, limit: int) -> int:
    """How many leading `width`-byte blocks, at most `limit`, `a` and `b` share."""
    view = memoryview(b)
    if a.startswith(view[: limit * width]):
        return limit
    lo, hi = 0, limit - 1  # the answer is in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(view[: mid * width]):
            lo = mid
        else:
            hi = mid - 1
    return lo
