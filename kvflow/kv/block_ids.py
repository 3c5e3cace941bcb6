"""What the block pools share: block ids as the pools take them (a list or an int64
array, turned into an array once per call by `as_ids` for their vectorized updates), a
prefix match's blocks in both forms, and the error a broken invariant raises."""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
BlockIds = Sequence[int] | IntArray
"""Block ids as a list or an int64 array (`PrefixMatch.ids`)."""


class IntegrityError(AssertionError):
    """A broken invariant of a pool, store or scheduler (a bug, never bad input)."""


_MAX_PACKED = 4096


@functools.lru_cache(maxsize=_MAX_PACKED)
def _packer(n: int) -> struct.Struct:
    """`n` native int64s (made once per count)."""
    return struct.Struct(f"{n}q")


def as_ids(block_ids: BlockIds | Iterable[int]) -> IntArray:
    """Block ids as an int64 array (read-only when made from a list: index with it,
    do not write into it)."""
    if isinstance(block_ids, np.ndarray):
        return block_ids.astype(np.int64, copy=False)
    if type(block_ids) is list and len(block_ids) <= _MAX_PACKED:
        # struct packs a list of ints at less than half the instructions of
        # np.fromiter / np.array (which convert each int through numpy's scalar code).
        return np.frombuffer(_packer(len(block_ids)).pack(*block_ids), dtype=np.int64)
    return np.fromiter(block_ids, dtype=np.int64)


class PrefixMatch:
    """The blocks holding the leading run of a key chain, as matched at one moment.
    `BlockPool.match` brings it up to date with one vectorized compare instead of a
    lookup per block."""

    __slots__ = ("block_ids", "ids", "versions")

    def __init__(self, block_ids: list[int], ids: IntArray, versions: IntArray) -> None:
        self.block_ids = block_ids
        """The blocks, in chain order (do not modify: matches share it)."""
        self.ids = ids
        self.versions = versions
