"""What a router sees of a fleet when it routes one request."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from kvflow.cluster.index import PrefixIndex
from kvflow.engine_adapters.simulated import LatencyModel
from kvflow.kv.chain_memo import MAX_BYTES, MAX_NODES, ChainMemo
from kvflow.kv.hashing import root_key
from kvflow.request import Request


class PeerNetwork:
    """The modelled network between instances: a pull of n blocks takes
    `latency + n * bytes_per_block / bandwidth` (links are not shared: each pull gets
    the whole bandwidth).

    Args:
        gbps: GB/s of one pull (`kv.transfer.peer_gbps`).
        latency_us: fixed cost of one pull (`kv.transfer.peer_latency_us`).
        bytes_per_block: bytes of one block's KV (equal on every instance that shares).
    """

    def __init__(self, gbps: float, latency_us: float, bytes_per_block: int) -> None:
        self.gbps = gbps
        self.latency_us = latency_us
        self.bytes_per_block = bytes_per_block

    def pull_time_s(self, num_blocks: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return self.latency_us * 1e-6 + num_blocks * self.bytes_per_block / (self.gbps * 1e9)


class FleetView:
    """The fleet as a router sees it at one moment: each instance's load and latency
    model, and the index of who holds which block (built from block events).

    Loads are kept by the fleet: `num_queued_tokens[i]` estimates the prefill tokens
    instance i has yet to compute (each routed request adds its prompt less the prefix
    it was expected to find cached; each step takes off its prefill tokens; an idle
    instance has none); `num_running[i]` counts its admitted requests;
    `num_used_blocks[i]` the device blocks they hold, of `device_blocks[i]` (what a
    real instance reports as its KV cache usage).
    """

    def __init__(
        self,
        latency: Sequence[LatencyModel],
        capacity: Sequence[int],
        index: PrefixIndex,
        block_size: int,
        network: PeerNetwork | None,
    ) -> None:
        self.num_instances = len(latency)
        self.latency = list(latency)
        self.capacity = list(capacity)
        """Blocks each instance can cache (all its tiers)."""
        self.index = index
        self.block_size = block_size
        self.network = network
        """How pulls between instances are timed; None when peers are off."""
        self.num_queued_tokens = [0] * self.num_instances
        self.num_running = [0] * self.num_instances
        self.device_blocks = [0] * self.num_instances
        """Each instance's device tier, in blocks (0: unknown, no memory term)."""
        self.num_used_blocks = [0] * self.num_instances
        """Device blocks each instance's admitted requests hold (not evictable)."""
        self.num_routed = [0] * self.num_instances
        """Requests routed to each instance so far."""
        self.now = 0.0
        # The view hashes the prompts of all its instances, so its memo is bounded as
        # theirs would be together: with one scheduler's bounds, 8 instances' traffic
        # evicted a conversation's earlier turns 8 times as soon (more hashing, and the
        # memo's pruning, for the fleet alone).
        n = self.num_instances
        self._memo = ChainMemo(block_size, MAX_BYTES * n, MAX_NODES * n)
        self._roots: dict[tuple[str, ...], int] = {}
        self._keys_for: tuple[Request, list[int]] | None = None
        self._runs_for: tuple[Request, list[int]] | None = None

    def advance(self, now: float) -> None:
        """Move the view to a new moment (the per-request answers are recomputed)."""
        self.now = now
        self._keys_for = self._runs_for = None

    @property
    def peers(self) -> bool:
        return self.network is not None

    def load(self, instance: int) -> int:
        """Queued prefill tokens plus running requests (each one decode per step)."""
        return self.num_queued_tokens[instance] + self.num_running[instance]

    def loads(self) -> list[int]:
        """`load` of each instance."""
        return list(map(operator.add, self.num_queued_tokens, self.num_running))

    def block_keys(self, request: Request) -> list[int]:
        """The keys of the request's full prompt blocks (hashed once per request)."""
        memo = self._keys_for
        if memo is not None and memo[0] is request:
            return memo[1]
        extra = request.extra_keys
        root = self._roots.get(extra)
        if root is None:
            root = self._roots[extra] = root_key(extra)
        keys: list[int] = []
        prompt = request.prompt_array
        self._memo.extend(keys, prompt, len(prompt) // self.block_size, root)
        self._keys_for = (request, keys)
        return keys

    def take_block_keys(self, request: Request) -> list[int]:
        """`block_keys`, handed over: the view forgets the list, which the instance's
        scheduler adopts as the request's own and grows as decoding fills blocks."""
        keys = self.block_keys(request)
        self._keys_for = None
        return keys

    def cached_blocks(self, request: Request) -> list[int]:
        """How many leading blocks of the request's prompt each instance holds, as
        the index says (computed once per request)."""
        memo = self._runs_for
        if memo is not None and memo[0] is request:
            return memo[1]
        runs = self.index.prefix_runs(self.block_keys(request))
        self._runs_for = (request, runs)
        return runs
