"""The router's own Prometheus metrics, and what it reads off an instance's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from kvflow.cluster.live import PeerInfo
from kvflow.peer.follow import PeerAddress

ADDED_LATENCY_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip


class RouterMetrics:
    """The router's own /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter(
            "kvflow:router_requests",
            "Requests forwarded, per instance and status class of its answer.",
            ["instance", "status"],
            registry=r,
        )
        self.retries = Counter(
            "kvflow:router_retries",
            "Requests sent on to another instance, per instance that failed them and why.",
            ["instance", "reason"],
            registry=r,
        )
        self.unroutable = Counter(
            "kvflow:router_unroutable", "Requests answered 503: no instance took them.", registry=r
        )
        self.added = Histogram(
            "kvflow:router_added_latency_seconds",
            "Time from a request's arrival at the router to its sending to the instance "
            "that answered it (reading, parsing, routing and failed tries).",
            buckets=ADDED_LATENCY_BUCKETS,
            registry=r,
        )
        self.healthy = Gauge(
            "kvflow:router_instance_healthy", "1 while an instance is in the rotation.",
            ["instance"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "kvflow:router_in_flight", "Requests in flight per instance.", ["instance"],
            registry=r,
        )  # fmt: skip
        self.info = Gauge("kvflow:router_info", "The router deciding (1).", ["router"], registry=r)
        self.instance_info = Gauge(
            "kvflow:router_instance_info",
            "The instances, numbered as the router's fleet view numbers them (1).",
            ["instance", "index"],
            registry=r,
        )
        self.directory_keys = Gauge(
            "kvflow:router_directory_keys",
            "Block keys the router's peer directory says an instance holds (from its "
            "block events).",
            ["instance"],
            registry=r,
        )


def scrape_instance(text: str) -> tuple[int, int, PeerInfo | None]:
    """Running requests, KV capacity in blocks (all tiers) and the peer service of an
    instance's /metrics text."""
    running = capacity = 0.0
    peer = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kvflow:num_requests_running":
                running += s.value
            elif s.name == "kvflow:kv_blocks_total":
                capacity += s.value
            elif s.name == "kvflow:peer_service_info":
                labels = s.labels
                peer = PeerInfo(
                    labels["peer_id"],
                    PeerAddress(labels["host"], int(labels["port"])),
                    bytes.fromhex(labels["fingerprint"]),
                    int(labels["block_size"]),
                )
    return int(running), int(capacity), peer


__all__ = ["ADDED_LATENCY_BUCKETS", "RouterMetrics", "scrape_instance"]
