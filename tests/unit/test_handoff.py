"""The prefill/decode handoff's two sides on real stores and sockets: leases pin a run
until a pull served it, it expired or the node closed; a decode node takes a ticket only
for its own model and prompt, follows the prefill node up to the ticket's event, and
gives up on one it cannot reach."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kvflow.peer.client import pull_into_cpu
from kvflow.peer.handoff import Handoffs, HandoffTicket, accept, keep
from kvflow.peer.node import PeerAddress, PeerNode
from tests.peer_builders import make_store, no_pins, peer_config, put_blocks, until
from tests.serve_process import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_pins_its_run_until_a_pull_served_its_last_block(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=8)
    put_blocks(store, "device", [1, 2, 3])
    handoffs = Handoffs(store, lease_s=10.0, clock=Clock())
    run = handoffs.keep([1, 2, 3, 99])  # 99 is not held: the run stops before it
    assert run is not None and run.keys == (1, 2, 3)
    assert handoffs.keep([1, 2, 3]) is not None  # the same prompt twice: two leases
    assert store.export_pins["device"] and handoffs.num_active == 2
    assert store.device.num_free_blocks == 5  # pinned: not evictable
    handoffs.on_served([1, 2])  # a pull that stopped short ends no lease
    assert handoffs.num_active == 2
    handoffs.on_served([2, 3])  # one lease per pull
    assert (handoffs.num_active, handoffs.num_pulled) == (1, 1)
    handoffs.on_served([3])
    assert (handoffs.num_active, handoffs.num_pulled) == (0, 2)
    assert no_pins(store)
    store.close()


def test_a_lease_expires_and_closing_ends_the_rest(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=8)
    put_blocks(store, "cpu", [5, 6])
    clock = Clock()
    handoffs = Handoffs(store, lease_s=10.0, clock=clock)
    assert handoffs.keep([42]) is None and no_pins(store)  # nothing held: no lease
    handoffs.keep([5, 6])
    clock.now = 5.0
    handoffs.keep([5])
    assert handoffs.expire() == 0
    clock.now = 10.0
    assert handoffs.expire() == 1 and handoffs.num_active == 1
    handoffs.close()
    assert handoffs.num_active == 0 and handoffs.num_expired == 1
    assert no_pins(store)
    store.close()


async def test_a_decode_node_follows_the_prefill_node_then_its_pull_ends_the_lease(
    tmp_path: Path,
) -> None:
    prefill_store, decode_store = make_store(tmp_path, "p"), make_store(tmp_path, "d")
    put_blocks(prefill_store, "device", [11, 12, 13])
    config = peer_config(handoff_wait_s=10.0)
    with anyio.fail_after(30):
        async with (
            PeerNode(prefill_store, config, [], peer_id="P") as prefill,
            PeerNode(decode_store, config, [], peer_id="D") as decode,
        ):
            ticket = keep(prefill, [11, 12, 13])
            assert ticket is not None
            assert ticket.peer == f"127.0.0.1:{prefill.port}" and ticket.peer_id == "P"
            assert ticket.num_tokens == 3 * 4
            # Not connected before: the ticket's address is connected to, followed.
            assert await accept(decode, ticket, [11, 12, 13, 14]) == "ready"
            assert set(decode.directory.held("P")) >= {11, 12, 13}
            assert prefill.handoffs.num_active == 1
            assert await pull_into_cpu(decode.clients["P"], decode_store, [11, 12, 13]) == 3
            await until(lambda: prefill.handoffs.num_active == 0)
            assert prefill.handoffs.num_pulled == 1
            assert decode.handoff_outcomes == {"ready": 1}
    assert no_pins(prefill_store)
    prefill_store.close()
    decode_store.close()


async def test_a_ticket_of_another_model_or_prompt_or_an_unreachable_peer(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path, "d")
    config = peer_config(handoff_wait_s=0.3)
    with anyio.fail_after(30):
        async with PeerNode(store, config, [], peer_id="D") as node:
            fingerprint = node.service.identity.fingerprint.hex()
            dead = PeerAddress("127.0.0.1", free_port())
            ticket = HandoffTicket(str(dead), "P", fingerprint, 0, (1, 2), 4)
            assert await accept(node, ticket._replace(fingerprint="00" * 16), [1, 2]) == (
                "mismatch"
            )
            assert await accept(node, ticket, [1, 3]) == "mismatch"
            assert await accept(node, ticket._replace(block_size=8), [1, 2]) == "mismatch"
            assert await accept(node, ticket._replace(peer_id="D"), [1, 2]) == "local"
            assert await accept(node, ticket, [1, 2, 5]) == "unreachable"
            await until(lambda: dead not in node._maintained)  # given up, not retried
            assert node.handoff_outcomes == {"mismatch": 3, "local": 1, "unreachable": 1}
    store.close()
