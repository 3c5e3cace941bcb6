"""The router process's routing: HTTP bodies read as the instances read them, the
fleet's registry routers deciding over a live view fed by a peer directory and the
router's own requests, and the health checks that put instances in the view."""

from __future__ import annotations

from array import array
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from kvflow.cluster.live import LiveFleet, PeerInfo
from kvflow.cluster.proxy_health import InstanceWatch
from kvflow.cluster.proxy_routing import prompt_ids, routing_request
from kvflow.cluster.routers import CacheAwareRouter, UnknownNameError, create, names
from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.text import PlaceholderCodec
from kvflow.kv.hashing import extend_block_keys, root_key
from kvflow.peer.follow import PeerAddress
from kvflow.peer.frames import KeyRecord, SeqFrame
from tests.serve_process import app_in_thread

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CODEC = PlaceholderCodec()
# Prefill costs time: holding a prefix makes an instance the faster choice.
CONFIG = KVFlowConfig.load(
    None,
    {
        "sim.preset": None,
        "sim.fixed_ms": 1,
        "sim.prefill_token_us": 50,
        "sim.decode_seq_us": 100,
        "kv.block_size": 4,
    },
)


def _keys(ids: list[int], block_size: int = 4) -> list[int]:
    """The block keys an instance's store gives `ids`' full blocks."""
    keys: list[int] = []
    extend_block_keys(keys, array("I", ids), len(ids) // block_size, block_size, root_key(()))
    return keys


def _fleet(num_instances: int, router: str = "cache-aware") -> LiveFleet:
    fleet = LiveFleet(
        [f"http://127.0.0.1:{8000 + i}" for i in range(num_instances)],
        CONFIG,
        create(router, CONFIG),
    )
    for i, inst in enumerate(fleet.instances):
        inst.healthy = True
        # As the health loop finds each instance's peer service and the follower
        # connects to it.
        address = PeerAddress("127.0.0.1", 9000 + i)
        fleet.scraped(i, 0, None, PeerInfo(f"peer-{i}", address, b"f" * 16, 4))
        fleet.follower.peer_at[address] = f"peer-{i}"
    return fleet


def _holds(fleet: LiveFleet, i: int, keys: list[int]) -> None:
    """Instance i's resync snapshot says it holds `keys` on device."""
    record = KeyRecord("stored", "device", np.array(keys, dtype=np.uint64))
    frame = SeqFrame(b"i" * 16, 0, (record,))
    assert fleet.directory.apply_resync(f"peer-{i}", frame, 0.0) == "applied"


def test_bodies_are_read_into_the_ids_the_instance_makes() -> None:
    assert prompt_ids(COMPLETIONS, {"prompt": "tok5 tok6"}, CODEC) == [5, 6]
    assert prompt_ids(COMPLETIONS, {"prompt": [7, 8, 9]}, CODEC) == [7, 8, 9]
    assert prompt_ids(COMPLETIONS, {"prompt": [[1, 2], [3]]}, CODEC) == [1, 2]
    messages = [{"role": "user", "content": [{"type": "text", "text": "tok3 "}, {"text": "tok4"}]}]
    expected = CODEC.encode_chat([{"role": "user", "content": "tok3 tok4"}], True)
    assert prompt_ids(CHAT, {"messages": messages}, CODEC) == expected
    assert prompt_ids(COMPLETIONS, {"prompt": 5}, CODEC) == []
    assert prompt_ids(CHAT, {"messages": "hi"}, CODEC) == []


def test_a_later_chat_turn_starts_with_the_earlier_turn_s_ids() -> None:
    first = [{"role": "system", "content": "a b c d e f g h"}, {"role": "user", "content": "q1"}]
    later = [
        *first,
        {"role": "assistant", "content": "tok1 tok2"},
        {"role": "user", "content": "q2"},
    ]
    a = prompt_ids(CHAT, {"messages": first}, CODEC)
    b = prompt_ids(CHAT, {"messages": later}, CODEC)
    assert b[: len(a)] == a and len(b) > len(a)


def test_an_unreadable_prompt_routes_as_one_token_by_load() -> None:
    request = routing_request(COMPLETIONS, {"prompt": [2**40], "max_tokens": "x"}, CODEC)
    assert list(request.prompt_token_ids) == [0] and request.max_new_tokens == 16
    asked = routing_request(CHAT, {"messages": [], "max_completion_tokens": 7}, CODEC)
    assert asked.max_new_tokens == 7


def test_cache_aware_sends_a_prompt_to_the_instance_whose_events_say_it_holds_it() -> None:
    fleet = _fleet(3)
    prompt = list(range(100, 124))  # 6 blocks
    _holds(fleet, 2, _keys(prompt)[:5])
    _holds(fleet, 1, _keys(prompt)[:2])
    ticket = fleet.route(routing_request(COMPLETIONS, {"prompt": prompt}, CODEC))
    assert ticket is not None and ticket.instance == 2
    assert ticket.num_queued_tokens == 24 - 5 * 4  # what it was not expected to hold
    fleet.directory.mark_down("peer-2")  # its peer connection went down
    fleet.finished(ticket)
    again = fleet.route(routing_request(COMPLETIONS, {"prompt": prompt}, CODEC))
    assert again is not None and again.instance == 1


def test_unhealthy_and_tried_instances_are_never_chosen() -> None:
    fleet = _fleet(3, "round-robin")
    fleet.instances[1].healthy = False
    request = routing_request(COMPLETIONS, {"prompt": [1, 2, 3]}, CODEC)
    chosen = []
    for _ in range(4):
        ticket = fleet.route(request)
        assert ticket is not None
        chosen.append(ticket.instance)
        fleet.finished(ticket)
    assert set(chosen) == {0, 2}
    assert fleet.route(request, tried=[0, 2]) is None


def test_prefill_instances_are_routed_among_apart_from_the_others() -> None:
    serving = ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    prefill = ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    fleet = LiveFleet(
        serving, CONFIG, create("round-robin"), prefill, prefill_router=create("cache-aware")
    )
    assert fleet.prefill_ids == (2, 3) and fleet.serving == fleet.instances[:2]
    for inst in fleet.instances:
        inst.healthy = True
    address = PeerAddress("127.0.0.1", 9003)  # instance 3's peer service
    fleet.scraped(3, 0, None, PeerInfo("peer-3", address, b"f" * 16, 4))
    fleet.follower.peer_at[address] = "peer-3"
    prompt = list(range(100, 124))
    _holds(fleet, 3, _keys(prompt))
    request = routing_request(COMPLETIONS, {"prompt": prompt}, CODEC)
    decoded = set()
    for _ in range(4):
        ticket = fleet.route(request)
        assert ticket is not None
        decoded.add(ticket.instance)
        fleet.finished(ticket)
        prefilled = fleet.route(request, prefill=True)  # its own router: cache-aware
        assert prefilled is not None and prefilled.instance == 3
        fleet.finished(prefilled)
    assert decoded == {0, 1}
    assert fleet.route(request, tried=[3], prefill=True) is not None
    assert fleet.route(request, tried=[2, 3], prefill=True) is None


def test_the_router_s_own_requests_load_the_view_until_they_are_answered() -> None:
    fleet = _fleet(2, "least-loaded")
    long = routing_request(COMPLETIONS, {"prompt": list(range(400))}, CODEC)
    first = fleet.route(long)
    assert first is not None and fleet.instances[first.instance].num_queued_tokens == 400
    short = routing_request(COMPLETIONS, {"prompt": [1, 2]}, CODEC)
    second = fleet.route(short)
    assert second is not None and second.instance != first.instance
    fleet.answered(first)  # its prefill is done: it runs (one decode per step)
    view = fleet.view((0, 1))
    assert view.num_queued_tokens[first.instance] == 0
    assert view.num_running[first.instance] == 1
    fleet.finished(first)
    fleet.finished(second)
    assert [inst.in_flight for inst in fleet.instances] == [0, 0]
    assert [inst.num_queued_tokens for inst in fleet.instances] == [0, 0]


def test_every_registered_router_routes_a_live_fleet() -> None:
    request = routing_request(COMPLETIONS, {"prompt": list(range(40))}, CODEC)
    for name in names():
        fleet = _fleet(3, name)
        ticket = fleet.route(request)
        assert ticket is not None and 0 <= ticket.instance < 3, name


def test_routers_come_out_of_the_fleet_registry_with_the_config_s_options() -> None:
    router = create("cache-aware", CONFIG)
    assert isinstance(router, CacheAwareRouter)
    assert router.balance_abs_threshold == CONFIG.router.cache_aware.balance_abs_threshold
    with pytest.raises(UnknownNameError, match=r"'nope'.*cache-aware"):
        create("nope")
    assert {"cache-aware", "least-loaded", "power-of-two", "round-robin"} <= set(names())


def test_a_peer_service_bound_to_every_address_is_reached_at_the_instance_s_host() -> None:
    fleet = LiveFleet(
        ["http://10.0.0.7:8001", "http://127.0.0.1:8002"], CONFIG, create("round-robin")
    )
    info = PeerInfo("p", PeerAddress("0.0.0.0", 9001), b"f" * 16, 4)
    fleet.scraped(0, 0, None, info)
    assert fleet.instances[0].peer is not None
    assert fleet.instances[0].peer.address == PeerAddress("10.0.0.7", 9001)
    fleet.scraped(0, 0, None, info._replace(address=PeerAddress("127.0.0.1", 9001)))
    assert fleet.instances[0].peer.address == PeerAddress("10.0.0.7", 9001)
    fleet.scraped(1, 3, 77, info._replace(address=PeerAddress("127.0.0.1", 9002)))
    assert fleet.instances[1].peer is not None
    assert fleet.instances[1].peer.address == PeerAddress("127.0.0.1", 9002)
    assert (fleet.instances[1].num_running, fleet.instances[1].capacity) == (3, 77)


@pytest.mark.parametrize(("metrics_status", "healthy"), [(200, True), (401, False), (500, False)])
def test_an_instance_is_in_the_rotation_only_when_its_metrics_were_read(
    metrics_status: int, healthy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """/health answers 200; /metrics answers `metrics_status` with one sample, or with
    an empty body (as an instance that wants a key the router lacks might): only a read
    scrape puts the instance in, with its capacity. One kept out says why, in the log
    and in the 503 of a request none took (it said nothing: an instance never healthy
    never "left" the rotation)."""
    text = 'kvflow:kv_blocks_total{tier="device"} 64\n'

    async def instance(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A real HTTP instance on loopback: 200 on /health, `metrics_status` on
        /metrics (the sample with 200, an empty body otherwise)."""
        ok = scope["path"] == "/health" or metrics_status == 200
        body = text.encode() if ok else b""
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200 if ok else metrics_status,
                    "headers": headers})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    registry = CollectorRegistry()

    with app_in_thread(instance) as url:
        fleet = LiveFleet([url], CONFIG, create("round-robin"))
        watch = InstanceWatch(fleet, Gauge("healthy", "", ["instance"], registry=registry), 60.0)

        async def first_round() -> None:
            async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
                await watch.start(client, tg)  # every instance checked once
                tg.cancel_scope.cancel()

        anyio.run(first_round)
    inst = fleet.instances[0]
    assert inst.healthy is healthy
    assert (inst.capacity == 64) is healthy
    assert registry.get_sample_value("healthy", {"instance": inst.url}) == int(healthy)
    said = [r.getMessage() for r in caplog.records if r.name == "kvflow.router"]
    if healthy:
        assert watch.reasons == {} and not [line for line in said if "not in" in line]
    else:
        why = f"/metrics answered {metrics_status}"
        assert watch.reasons == {0: why}
        assert said == [f"kvflow router: {url} is not in the rotation ({why})"], said
