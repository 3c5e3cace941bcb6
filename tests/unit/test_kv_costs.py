"""The store's cost model: moving blocks between tiers against recomputing them."""

from __future__ import annotations

from kvflow.kv.store import KVStore
from tests.builders import make_config

WITH_CPU = {"kv.cpu.num_blocks": 8}


def test_swapping_is_cheaper_only_where_recomputing_costs_more() -> None:
    slow = KVStore(make_config(**WITH_CPU, **{"kv.recompute_token_us": 1000.0}).kv)
    fast = KVStore(make_config(**WITH_CPU, **{"kv.recompute_token_us": 0.001}).kv)
    assert slow.costs.swap_is_cheaper(4)  # recomputing a token takes a millisecond
    assert not fast.costs.swap_is_cheaper(4)
    assert not slow.costs.swap_is_cheaper(0)
