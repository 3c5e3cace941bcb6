"""What moving blocks between tiers would cost, against recomputing them: the estimates
behind a `KVStore`'s load, pull and swap decisions (`load_policy`)."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.config import KVConfig
from kvflow.kv.location import TierName
from kvflow.kv.transfer import PEER_DIRECTION, SimCopyEngine


class TransferCosts:
    """Copy times by the virtual-time engine's model of `config.transfer`, and recompute
    times by `config.recompute_token_us`.

    Args:
        config: the store's KV config (block size and bytes, load policy).
        model: the engine whose `duration_s` prices a copy (the store's own when it is a
            `SimCopyEngine`, so the estimates match the copies it models).
    """

    def __init__(self, config: KVConfig, model: SimCopyEngine) -> None:
        self.config = config
        self.block_size = config.block_size
        self.bytes_per_block = config.bytes_per_block()
        self._cost_model = model

    def load_time_s(self, sources: Sequence[tuple[TierName, int]]) -> float:
        """Estimated time to bring these blocks to device."""
        num_cpu = sum(1 for tier, _ in sources if tier == "cpu")
        num_disk = len(sources) - num_cpu
        model = self._cost_model
        t = 0.0
        if num_cpu:
            t += model.duration_s("cpu_to_device", num_cpu * self.bytes_per_block)
        if num_disk:
            t += model.duration_s("disk_to_device", num_disk * self.bytes_per_block)
        return t

    def pull_time_s(self, num_blocks: int) -> float:
        """Estimated time to pull blocks from a peer into cpu and bring them to device."""
        nbytes = num_blocks * self.bytes_per_block
        model = self._cost_model
        return model.duration_s(PEER_DIRECTION, nbytes) + model.duration_s("cpu_to_device", nbytes)

    def should_pull(self, num_blocks: int) -> bool:
        """Whether pulling `num_blocks` from a peer beats recomputing them (load_policy)."""
        policy = self.config.load_policy
        if num_blocks <= 0 or policy == "never":
            return False
        return policy == "always" or self.pull_time_s(num_blocks) < self.recompute_time_s(
            num_blocks
        )

    def recompute_time_s(self, num_blocks: int) -> float:
        return num_blocks * self.block_size * self.config.recompute_token_us * 1e-6

    def should_load(self, sources: Sequence[tuple[TierName, int]]) -> bool:
        """Whether loading these blocks to device beats recomputing them (load_policy)."""
        policy = self.config.load_policy
        if not sources or policy == "never":
            return False
        if policy == "always":
            return True
        return self.load_time_s(sources) < self.recompute_time_s(len(sources))

    def swap_is_cheaper(self, num_blocks: int) -> bool:
        """Whether demoting `num_blocks` to cpu and reloading them would beat recomputing
        them (whether the store has a cpu tier to swap to is the caller's question:
        `KVManager.free_preempted`)."""
        if num_blocks == 0:
            return False
        nbytes = num_blocks * self.bytes_per_block
        model = self._cost_model
        swap = model.duration_s("device_to_cpu", nbytes) + model.duration_s("cpu_to_device", nbytes)
        return swap < self.recompute_time_s(num_blocks)
