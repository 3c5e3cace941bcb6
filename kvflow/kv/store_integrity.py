"""For `KVStore.check_integrity`: the references that copies in flight and transfers to
peers hold, which a pool's counts must add up to beside the requests' own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvflow.kv.block_pool import BlockPool, IntegrityError
from kvflow.kv.transfer import Transfer


def count_pins(
    pools: Mapping[str, BlockPool | None],
    export_pins: Mapping[str, Mapping[int, int]],
    inflight: Iterable[Transfer],
) -> dict[str, list[int]]:
    """Tier -> the references held on each of its slots by `export_pins` and by the
    copies `inflight` (their sources and their targets).

    Raises:
        IntegrityError: a copy's target is indexed before its copy finished.
    """
    pins: dict[str, list[int]] = {
        tier: [0] * pool.num_blocks for tier, pool in pools.items() if pool
    }
    for tier, slot_pins in export_pins.items():
        for slot, num_pins in slot_pins.items():
            pins[tier][slot] += num_pins
    for t in inflight:
        for s in t.src_slots:
            pins[t.src_tier][s] += 1
        for d in t.dst_slots:
            pins[t.dst_tier][d] += 1  # (a KeyError for an unconfigured tier)
            dst_pool = pools[t.dst_tier]
            if dst_pool is not None and dst_pool.block_keys[d] is not None:
                raise IntegrityError(f"{t.dst_tier} block {d} is indexed before its copy finished")
    return pins
