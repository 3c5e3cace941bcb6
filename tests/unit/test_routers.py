"""Routers, the block index fed by store events, and the router registry."""

from __future__ import annotations

import pytest

from kvflow.cluster import routers
from kvflow.cluster.index import BlockIndex
from kvflow.cluster.view import FleetView, PeerNetwork
from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.simulated import PRESETS
from kvflow.kv.store import BlockEvent, KVStore
from kvflow.request import Request

LAT = PRESETS["llama3-8b-h100"]


def make_view(n: int = 3, block_size: int = 4, peers: bool = False) -> FleetView:
    network = PeerNetwork(12.5, 50.0, 2**20) if peers else None
    return FleetView([LAT] * n, [100] * n, BlockIndex(n), block_size, network)


def request(tokens: int = 32, base: int = 0, rid: str = "r") -> Request:
    return Request(rid, list(range(base, base + tokens)), 4)


def test_store_events_feed_the_index_stored_and_dropped() -> None:
    config = KVFlowConfig.from_dict({}, {"kv.block_size": 4, "kv.device.num_blocks": 2})
    store = KVStore(config.kv)
    index, from_events = BlockIndex(2), BlockIndex(2)
    events: list[BlockEvent] = []
    store.add_key_listeners(index.key_listeners(1))  # the changes without event objects
    store.add_listener(from_events.listener(1))
    store.add_listener(events.append)
    pool = store.device
    blocks = pool.allocate(2)
    pool.seal_many(blocks, [11, 12])
    pool.release(blocks)
    assert index.holders(11) == {1} and index.holders(12) == {1}
    assert index.num_blocks == [0, 2]
    pool.allocate(1)  # evicts the least recently used cached block
    assert [(e.kind, e.tier) for e in events] == [("stored", "device"), ("dropped", "device")]
    assert len(index) == 1 and index.num_blocks == [0, 1]
    assert from_events.prefix_runs([11, 12]) == index.prefix_runs([11, 12])
    assert from_events.num_blocks == index.num_blocks


def test_an_event_of_an_unknown_tier_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tier 'tape'"):
        BlockIndex(1).apply(0, BlockEvent("stored", "tape", (1,)))  # type: ignore[arg-type]


def test_prefix_runs_count_each_instance_leading_blocks() -> None:
    index = BlockIndex(3)
    index.apply(0, BlockEvent("stored", "device", (1, 2, 3)))
    index.apply(1, BlockEvent("stored", "cpu", (1,)))
    assert index.prefix_runs([1, 2, 3, 4]) == [3, 1, 0]
    assert index.prefix_runs([9, 2]) == [0, 0, 0]
    index.apply(0, BlockEvent("dropped", "device", (3,)))
    assert index.prefix_runs([1, 2, 3]) == [2, 1, 0]


def test_round_robin_cycles() -> None:
    view = make_view(3)
    router = routers.create("round-robin")
    assert [router.route(request(), view) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_loaded_takes_the_lowest_queued_tokens_plus_running() -> None:
    view = make_view(3)
    view.num_queued_tokens[:] = [100, 5, 50]
    view.num_running[:] = [0, 60, 0]
    assert routers.create("least-loaded").route(request(), view) == 2


def test_power_of_two_is_seeded_and_picks_the_less_loaded_of_its_two() -> None:
    view = make_view(4)
    view.num_queued_tokens[:] = [0, 10, 20, 30]
    config = KVFlowConfig.from_dict({}, {"router.power_of_two.seed": 7})
    first, second = routers.create("power-of-two", config), routers.create("power-of-two", config)
    picks = [first.route(request(), view) for _ in range(20)]
    assert picks == [second.route(request(), view) for _ in range(20)]
    assert 3 not in picks  # the most loaded never wins a pair


def feed(view: FleetView, instance: int, keys: list[int]) -> None:
    index = view.index
    assert isinstance(index, BlockIndex)
    index.apply(instance, BlockEvent("stored", "device", tuple(keys)))


def test_cache_aware_goes_where_the_prefix_is() -> None:
    view = make_view(3)
    req = request(64)
    keys = view.block_keys(req)
    feed(view, 2, keys[:10])
    assert routers.create("cache-aware").route(req, view) == 2


def test_cache_aware_weighs_a_queue_against_the_prefill_it_saves() -> None:
    view = make_view(2)
    req = request(64)  # 16 blocks of 4 tokens
    feed(view, 0, view.block_keys(req))
    view.num_queued_tokens[0] = 10  # shorter than the 64 tokens it saves
    assert routers.create("cache-aware").route(req, view) == 0
    view.num_queued_tokens[0] = 1000
    view.advance(1.0)
    assert routers.create("cache-aware").route(req, view) == 1


def test_cache_aware_falls_back_to_the_shortest_queue_when_loads_diverge() -> None:
    config = KVFlowConfig.from_dict(
        {},
        {
            "router.cache_aware.balance_abs_threshold": 100,
            "router.cache_aware.balance_rel_threshold": 2.0,
        },
    )
    view = make_view(3)
    req = request(4000)
    feed(view, 0, view.block_keys(req))
    view.num_queued_tokens[:] = [150, 20, 10]  # below its savings, past the thresholds
    assert routers.create("cache-aware", config).route(req, view) == 2
    assert routers.create("cache-aware").route(req, view) == 0  # defaults: not diverged


def test_cache_aware_avoids_an_instance_whose_device_tier_cannot_take_the_request() -> None:
    view = make_view(2)
    req = request(64)  # 16 blocks of 4 tokens
    feed(view, 0, view.block_keys(req)[:8])  # instance 0 holds half the prompt
    view.device_blocks[:] = [100, 100]
    view.num_used_blocks[:] = [90, 0]  # its running requests hold 90 blocks: 8 fit
    router = routers.create("cache-aware")
    assert router.route(req, view) == 0
    view.num_used_blocks[0] = 93  # 7 free: the 8 uncached blocks would wait
    view.advance(1.0)
    assert router.route(req, view) == 1
    view.num_used_blocks[1] = 99  # neither can take it now: the cost decides again
    view.advance(2.0)
    assert router.route(req, view) == 0


def test_cache_aware_counts_a_peer_pull_when_it_beats_prefill() -> None:
    view = make_view(2, block_size=16, peers=True)
    req = request(16 * 64)
    feed(view, 0, view.block_keys(req))
    # The holder's queue is half the prompt's prefill: without peers it still wins; with
    # them, pulling 64 blocks (~11 ms) beats both.
    view.num_queued_tokens[0] = 16 * 32
    assert routers.create("cache-aware").route(req, view) == 1
    no_peers = make_view(2, block_size=16)
    feed(no_peers, 0, no_peers.block_keys(req))
    no_peers.num_queued_tokens[0] = 16 * 32
    assert routers.create("cache-aware").route(req, no_peers) == 0


def test_an_unknown_router_lists_the_known_ones() -> None:
    with pytest.raises(routers.UnknownNameError, match="round-robin, least-loaded"):
        routers.create("nearest")
