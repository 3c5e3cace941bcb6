"""The KV store the scheduler and policies talk to.

It owns the tiers' block pools (only the device tier so far) and answers the one
question every policy asks: where does this prefix live (`locate`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.config import KVConfig
from kvflow.kv.block_pool import BlockPool
from kvflow.kv.location import PrefixLocation


class KVStore:
    def __init__(self, config: KVConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.device = BlockPool(config.device.num_blocks)

    def locate(self, block_keys: Sequence[int]) -> PrefixLocation:
        """The cached run of leading blocks with these keys, per tier."""
        n = self.device.count_prefix(block_keys)
        return PrefixLocation(device_tokens=n * self.block_size)

    def match_device(self, block_keys: Sequence[int], max_blocks: int) -> list[int]:
        """Device block ids of the leading cached blocks, at most `max_blocks`."""
        lookup = self.device.lookup
        out: list[int] = []
        for key in block_keys[:max_blocks]:
            b = lookup(key)
            if b is None:
                break
            out.append(b)
        return out

    def check_integrity(self, expected_device_refs: Sequence[int] | None = None) -> None:
        self.device.check_integrity(expected_device_refs)
