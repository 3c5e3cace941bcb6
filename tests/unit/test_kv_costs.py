"""The store's cost model: moving blocks between tiers against recomputing them."""

from __future__ import annotations

from kvflow.kv.store import KVStore
from tests.builders import make_config

SLOW_RECOMPUTE = {"kv.recompute_token_us": 1000.0}
"""Recomputing a token takes a millisecond: any copy beats it."""


def test_swap_is_never_cheaper_for_a_store_with_no_cpu_tier() -> None:
    with_cpu = KVStore(make_config(**{"kv.cpu.num_blocks": 8}, **SLOW_RECOMPUTE).kv)
    without_cpu = KVStore(make_config(**SLOW_RECOMPUTE).kv)
    assert without_cpu.cpu is None
    assert with_cpu.costs.swap_is_cheaper(4)
    assert not without_cpu.costs.swap_is_cheaper(4)  # there is nowhere to swap to
    assert not with_cpu.costs.swap_is_cheaper(0)
