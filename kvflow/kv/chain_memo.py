"""A memo of recent prompts' block keys, as a radix tree of their blocks.

Prompts often start alike: a shared system prompt, the earlier turns of a conversation
(a turn's prompt is the previous turn's prompt, its output and a new user message). The
memo keeps the full blocks of recent prompts, packed, with their keys, in one radix tree
per root key: a node holds a run of blocks (their bytes and keys), its children are found
by the bytes of their first block. A new prompt walks down its tree comparing bytes (one
memcmp per node passed, one dict lookup per branch), copies the keys of the longest prefix
the tree holds, hashes only the blocks after, and adds those as a new leaf. The keys are
the ones hashing gives: equal blocks under equal parents have equal keys, and a node's
keys were hashed under the blocks on the path to it.

Memory is bounded: at most `max_bytes` of packed tokens (4 bytes a token, each held
once however many prompts share it) and `max_nodes` nodes; past either, the least
recently used leaves go first. Each block held costs its packed tokens and about 40
bytes for its key.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Sequence

from kvflow.kv.hashing import NEEDS_BYTESWAP, chain_keys, extend_block_keys, pack_tokens


class _Node:
    __slots__ = ("children", "first_block", "keys", "live", "parent", "root", "seg", "stamp")

    def __init__(
        self, seg: bytes, keys: list[int], parent: _Node | None, first_block: bytes
    ) -> None:
        self.seg = seg
        """The packed tokens of the node's blocks."""
        self.keys = keys
        """The keys of the node's blocks."""
        self.parent = parent
        self.first_block = first_block
        """The packed tokens of the first block: the node's key among its parent's
        children."""
        self.children: dict[bytes, _Node] = {}
        self.stamp = 0
        """When the node was last on a prompt's path (a clock of `extend` calls)."""
        self.live = True
        self.root: int | None = None
        """A tree's top node (no blocks): the root key it stands for."""


MAX_BYTES = 32 * 2**20
"""A memo's default bound on packed tokens (one scheduler's)."""
MAX_NODES = 8192
"""A memo's default bound on runs of blocks (one scheduler's)."""


class ChainMemo:
    """Block keys of recent prompts, reused for the prefix a new prompt shares with them.

    Args:
        block_size: tokens per block.
        max_bytes: bound on the packed tokens held.
        max_nodes: bound on the runs of blocks held (about two per distinct prompt).
    """

    def __init__(
        self, block_size: int, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES
    ) -> None:
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_nodes = max_nodes
        self.num_reused_keys = 0
        """Keys copied rather than hashed, over the memo's life."""
        self.num_bytes = 0
        """Packed tokens held."""
        self.num_nodes = 0
        """Runs of blocks held (not counting a tree's top node)."""
        self._roots: dict[int, _Node] = {}
        self._clock = 0
        self._leaves: list[tuple[int, int, _Node]] = []
        """A heap of (stamp, tiebreak, node) for leaves, oldest first; an entry is stale
        once its node is gone, has children or has been used since."""
        self._tiebreak = itertools.count()

    def extend(
        self, keys: list[int], token_ids: Sequence[int], num_full_blocks: int, root: int
    ) -> None:
        """`extend_block_keys`, copying the keys of the longest prefix a recent prompt
        shares with this one (a new prompt: `keys` empty)."""
        bs = self.block_size
        if keys or num_full_blocks <= 1 or len(token_ids) - num_full_blocks * bs > bs:
            extend_block_keys(keys, token_ids, num_full_blocks, bs, root)
            return
        if isinstance(token_ids, array) and token_ids.typecode == "I" and not NEEDS_BYTESWAP:
            packed = memoryview(token_ids).cast("B")  # read in place, not copied
        else:
            packed = memoryview(pack_tokens(token_ids))
        try:
            self._extend(keys, packed, num_full_blocks, root)
        finally:
            packed.release()  # the array may grow again
        self._evict()

    def _extend(self, keys: list[int], packed: memoryview, num_full_blocks: int, root: int) -> None:
        width = 4 * self.block_size
        self._clock += 1
        clock = self._clock
        node = self._roots.get(root)
        if node is None:
            node = self._roots[root] = _Node(b"", [], None, b"")
            node.root = root
        node.stamp = clock
        pos = 0  # blocks matched so far
        while pos < num_full_blocks:
            start = pos * width
            child = node.children.get(packed[start : start + width].tobytes())
            if child is None:
                break
            held = len(child.keys)
            common = _common_blocks(
                packed, start, child.seg, width, min(held, num_full_blocks - pos)
            )
            pos += common
            if common == held:
                keys += child.keys
                node = child
                node.stamp = clock
                continue
            keys += child.keys[:common]
            # The prompt ends or turns off inside the child; the blocks it shares split
            # off (the rest keeps its stamp: it was not used).
            node = self._split(child, common, width) if pos < num_full_blocks else child
            node.stamp = clock
            break
        self.num_reused_keys += pos
        if pos < num_full_blocks:
            chain_keys(keys, packed, pos, num_full_blocks, width, keys[-1] if keys else root)
            leaf_bytes = packed[pos * width : num_full_blocks * width].tobytes()
            leaf = _Node(leaf_bytes, keys[pos:], node, leaf_bytes[:width])
            leaf.stamp = clock
            node.children[leaf.first_block] = leaf
            self.num_bytes += len(leaf.seg)
            self.num_nodes += 1
            node = leaf
        if not node.children:
            heapq.heappush(self._leaves, (clock, next(self._tiebreak), node))

    def _split(self, node: _Node, num_blocks: int, width: int) -> _Node:
        """Split `node`'s first `num_blocks` blocks off into a new parent, returned."""
        parent = node.parent
        assert parent is not None
        upper = _Node(
            node.seg[: num_blocks * width], node.keys[:num_blocks], parent, node.first_block
        )
        upper.stamp = node.stamp
        parent.children[upper.first_block] = upper
        node.seg = node.seg[num_blocks * width :]
        node.keys = node.keys[num_blocks:]
        node.first_block = node.seg[:width]
        node.parent = upper
        upper.children[node.first_block] = node
        self.num_nodes += 1
        return upper

    def _evict(self) -> None:
        """Drop least recently used leaves while over a bound."""
        leaves = self._leaves
        while (self.num_bytes > self.max_bytes or self.num_nodes > self.max_nodes) and leaves:
            stamp, _, node = heapq.heappop(leaves)
            if not node.live or node.children or node.stamp != stamp:
                continue  # stale
            parent = node.parent
            assert parent is not None
            del parent.children[node.first_block]
            node.live = False
            self.num_bytes -= len(node.seg)
            self.num_nodes -= 1
            if not parent.children:
                if parent.root is not None:
                    del self._roots[parent.root]
                else:
                    heapq.heappush(leaves, (parent.stamp, next(self._tiebreak), parent))
        if len(leaves) > 2 * self.num_nodes + 64:  # mostly stale: rebuild
            self._leaves = [
                (n.stamp, next(self._tiebreak), n) for n in self._nodes() if not n.children
            ]
            heapq.heapify(self._leaves)

    def _nodes(self) -> list[_Node]:
        """Every node held below the trees' top nodes."""
        out: list[_Node] = []
        stack = list(self._roots.values())
        while stack:
            children = stack.pop().children.values()
            out += children
            stack += children
        return out


def _common_blocks(a: memoryview, start: int, b: bytes, width: int, limit: int) -> int:
    """How many leading `width`-byte blocks, at most `limit`, `a[start:]` and `b` share."""
    if b.startswith(a[start : start + limit * width]):
        return limit
    lo, hi = 0, limit - 1  # the answer is in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[start : start + mid * width]):
            lo = mid
        else:
            hi = mid - 1
    return lo
