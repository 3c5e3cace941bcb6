"""What a `KVStore` moved between its tiers."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvflow.kv.transfer import DIRECTIONS, PEER_DIRECTION


@dataclass(slots=True)
class StoreStats:
    """What moved between tiers. Block counts; bytes per direction."""

    num_promoted_blocks: int = 0
    num_demoted_blocks: int = 0
    num_disk_writes: int = 0
    num_tier_errors: int = 0
    num_disk_blocks_recovered: int = 0
    """Blocks a persistent disk tier found good at start, indexed as cached blocks."""
    num_disk_blocks_dropped: int = 0
    """Blocks a persistent disk tier dropped at start: a torn record, missing bytes (a
    truncated slab) or bytes that fail their checksum."""
    bytes_moved: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*DIRECTIONS, PEER_DIRECTION), 0)
    )
    """Bytes per direction; `peer_to_cpu` counts the bytes of pulled blocks that landed."""
    num_pulls: int = 0
    num_failed_pulls: int = 0
    """Pulls that landed fewer blocks than asked (stale hint, bad checksum, peer down)."""
