"""The router process's routing decisions: prompt keys, and each router's choice."""

from __future__ import annotations

import pytest

from kvflow.cluster.proxy_routing import (
    BLOCK_CHARS,
    BLOCK_TOKENS,
    CacheAware,
    InstanceState,
    ProxyView,
    RequestInfo,
    create,
    names,
    request_info,
)

CHAT = "/v1/chat/completions"


def _view(loads: list[int], candidates: list[int] | None = None) -> ProxyView:
    instances = [
        InstanceState(f"http://i{i}", healthy=True, in_flight=n) for i, n in enumerate(loads)
    ]
    return ProxyView(instances, list(range(len(loads))) if candidates is None else candidates)


def test_a_later_chat_turn_extends_the_earlier_turns_keys() -> None:
    first = [{"role": "system", "content": "x" * 300}, {"role": "user", "content": "q1"}]
    later = [*first, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2" * 50}]
    a = request_info(CHAT, {"messages": first}).block_keys
    b = request_info(CHAT, {"messages": later}).block_keys
    assert len(a) == (300 + len("<system>\n<user>q1\n")) // BLOCK_CHARS
    assert len(b) > len(a) and b[: len(a)] == a


def test_keys_are_chained_a_changed_first_block_changes_all() -> None:
    a = request_info("/v1/completions", {"prompt": "a" * 256}).block_keys
    b = request_info("/v1/completions", {"prompt": "b" + "a" * 255}).block_keys
    assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_token_id_prompts_are_keyed_per_block_of_ids() -> None:
    keys = request_info("/v1/completions", {"prompt": list(range(BLOCK_TOKENS * 3 + 1))})
    assert len(keys.block_keys) == 3
    assert request_info("/v1/completions", {"prompt": 5}).block_keys == ()


def test_round_robin_skips_instances_that_are_not_candidates() -> None:
    router = create("round-robin")
    view = _view([0, 0, 0], candidates=[0, 2])
    assert [router.route(RequestInfo(()), view) for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_and_power_of_two_avoid_the_loaded_instance() -> None:
    view = _view([5, 0, 9])
    assert create("least-loaded").route(RequestInfo(()), view) == 1
    p2 = create("power-of-two")
    assert all(p2.route(RequestInfo(()), _view([0, 9])) == 0 for _ in range(20))


def test_cache_aware_follows_the_longest_recorded_prefix() -> None:
    router = CacheAware()
    info = RequestInfo((1, 2, 3))
    assert router.route(info, _view([0, 0, 0])) == 0  # nothing recorded: least loaded
    router.routed(RequestInfo((1, 2)), 2)
    router.routed(RequestInfo((1,)), 1)
    assert router.route(info, _view([0, 0, 3])) == 2
    router.forget(2)
    assert router.route(info, _view([0, 0, 3])) == 1


def test_cache_aware_leaves_a_holder_that_is_far_more_loaded() -> None:
    router = CacheAware(balance_abs=16, balance_rel=2.0)
    router.routed(RequestInfo((7, 8)), 0)
    assert router.route(RequestInfo((7, 8)), _view([16, 0])) == 0
    assert router.route(RequestInfo((7, 8)), _view([40, 0])) == 1


def test_cache_aware_forgets_the_least_recent_keys_beyond_its_bound() -> None:
    router = CacheAware(max_keys=2)
    router.routed(RequestInfo((1, 2, 3)), 0)
    assert router.prefix_run((1, 2, 3), 0) == 0 and router.prefix_run((2, 3), 0) == 2


def test_unknown_router_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*cache-aware"):
        create("nope")
    assert names() == ["cache-aware", "least-loaded", "power-of-two", "round-robin"]
