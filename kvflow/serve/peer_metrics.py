"""Prometheus metrics of an instance's peer layer (`kvflow serve --peer-port`).

Peer hit tokens and bytes pulled are also in the engine's families
(`kvflow:prefix_cache_hits_by_tier{tier="peer"}`,
`kvflow:kv_tier_bytes_moved{direction="peer_to_cpu"}`); these add the peer layer's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvflow.serve.metrics import PREFIX

if TYPE_CHECKING:
    from kvflow.peer.node import PeerNode


class PeerCollector:
    """Reads `node()` at scrape time (nothing while it returns None)."""

    def __init__(self, node: Callable[[], PeerNode | None], model_name: str) -> None:
        self._node = node
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        node = self._node()
        if node is None:
            return
        stats = node.stats()
        store = node.store.stats
        name = self._model_name
        values: tuple[tuple[str, str, float, bool], ...] = (
            ("peers_up", "Peers connected and authenticated.", stats.peers_up, False),
            (
                "peer_directory_keys",
                "Block keys this instance knows peers hold (summed over peers).",
                node.directory.num_keys(),
                False,
            ),
            ("peer_pulls", "Pulls of blocks from peers started.", store.num_pulls, True),
            (
                "peer_pull_failures",
                "Pulls that landed fewer blocks than asked (stale hint, bad checksum, "
                "peer down or timed out); the rest was recomputed.",
                stats.num_pull_failures,
                True,
            ),
            (
                "peer_bytes_pulled",
                "Bytes of blocks pulled from peers that landed intact.",
                store.bytes_moved.get("peer_to_cpu", 0),
                True,
            ),
            (
                "peer_refused",
                "Connections to listed peers refused at the handshake.",
                stats.num_refused_peers,
                True,
            ),
            (
                "peer_blocks_served",
                "Blocks this instance served to peers' pulls.",
                stats.service.num_blocks_served,
                True,
            ),
            (
                "peer_connections_refused",
                "Connections to this instance's peer service refused at the handshake.",
                stats.service.num_refused,
                True,
            ),
        )
        # What a router needs to follow this instance's block events (`kvflow router`).
        identity = node.service.identity
        info = GaugeMetricFamily(
            PREFIX + "peer_service_info",
            "This instance's peer service: where it listens, its model fingerprint and "
            "block size (1 while it runs).",
            labels=["model_name", "peer_id", "host", "port", "fingerprint", "block_size"],
        )
        info.add_metric(
            [
                name,
                identity.peer_id,
                node.config.host,
                str(node.port),
                identity.fingerprint.hex(),
                str(node.store.block_size),
            ],
            1,
        )
        yield info
        for metric, doc, value, is_counter in values:
            family_type = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = family_type(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            yield family
        yield from _handoff_families(node, name)


def _handoff_families(node: PeerNode, name: str) -> Iterator[Metric]:
    """The prefill/decode handoff's figures (`kvflow.peer.handoff`)."""
    handoffs = node.handoffs
    leases = GaugeMetricFamily(
        PREFIX + "handoff_leases",
        "Prompts' KV kept pinned for a decode instance to pull (prefill side).",
        labels=["model_name"],
    )
    leases.add_metric([name], handoffs.num_active)
    yield leases
    kept = CounterMetricFamily(
        PREFIX + "handoffs_kept",
        "Prompts' KV kept for a decode instance (prefill side).",
        labels=["model_name"],
    )
    kept.add_metric([name], handoffs.num_kept)
    yield kept
    ended = CounterMetricFamily(
        PREFIX + "handoff_leases_ended",
        "Handoff leases ended: pulled (a pull served the run's last block) or expired.",
        labels=["model_name", "how"],
    )
    ended.add_metric([name, "pulled"], handoffs.num_pulled)
    ended.add_metric([name, "expired"], handoffs.num_expired)
    yield ended
    received = CounterMetricFamily(
        PREFIX + "handoffs_received",
        "Handoff tickets taken (decode side) by outcome: ready (the blocks are known at "
        "the prefill instance and pulled), local, mismatch (another model or prompt), "
        "unreachable (the prefill instance was not followed within peer.handoff_wait_s).",
        labels=["model_name", "outcome"],
    )
    for outcome in ("ready", "local", "mismatch", "unreachable"):
        received.add_metric([name, outcome], node.handoff_outcomes.get(outcome, 0))
    yield received


__all__ = ["PeerCollector"]
