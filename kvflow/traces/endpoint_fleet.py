"""`kvflow replay --endpoint ROUTER_URL` against a `kvflow router`: the fleet's figures,
as a fleet replay in virtual time reports them, from the router's and each instance's
/metrics scraped before and after the run (the differences are the run's).

- requests routed to each instance: the router's `kvflow:router_requests_total`;
- each instance's prefix hit rate: its scheduler's own counters
  (`kvflow:prefix_cache_hits_total` / `kvflow:prefix_cache_queries_total`, tokens at
  admission), the counters a simulated instance's report is made of; the fleet's is
  their sums' ratio;
- requests each instance finished: `kvflow:request_success_total`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table


class InstanceCounters(NamedTuple):
    url: str
    num_routed: float
    """Requests the router sent it that it accepted (any answer but 503)."""
    num_finished: float
    prefix_query_tokens: float
    prefix_hit_tokens: float


class FleetCounters(NamedTuple):
    router: str
    instances: list[InstanceCounters]


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def scrape_fleet(client: httpx.AsyncClient, base_url: str) -> FleetCounters | None:
    """The router's and its instances' counters now (instances in the router's order);
    None when `base_url` is not a kvflow router (it has no `kvflow:router_info`)."""
    try:
        response = await client.get(f"{base_url}/metrics")
        if response.status_code != 200:
            return None
        router = _samples(response.text)
    except (httpx.HTTPError, ValueError):
        return None
    names = [labels.get("router", "") for name, labels, _ in router if name == "kvflow:router_info"]
    if not names:
        return None
    numbered = [
        (int(labels["index"]), labels["instance"])
        for name, labels, _ in router
        if name == "kvflow:router_instance_info"
    ]
    urls = [url for _, url in sorted(numbered)]
    routed = dict.fromkeys(urls, 0.0)
    for name, labels, value in router:
        if name == "kvflow:router_requests_total" and labels.get("status") != "5xx":
            routed[labels["instance"]] = routed.get(labels["instance"], 0.0) + value
    instances = []
    for url in urls:
        totals = {"request_success": 0.0, "prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}
        try:
            text = (await client.get(f"{url}/metrics")).text
            for name, _, value in _samples(text):
                key = name.removeprefix("kvflow:").removesuffix("_total")
                if key in totals:
                    totals[key] += value
        except (httpx.HTTPError, ValueError):
            pass  # a dead instance: its counters count as 0 from then on
        instances.append(
            InstanceCounters(
                url,
                routed.get(url, 0.0),
                totals["request_success"],
                totals["prefix_cache_queries"],
                totals["prefix_cache_hits"],
            )
        )
    return FleetCounters(names[0], instances)


def _rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries else None


def fleet_figures(before: FleetCounters, after: FleetCounters) -> dict[str, Any]:
    """The run's fleet figures (the differences of two scrapes), keyed as a virtual-time
    fleet report's `fleet` where they mean the same."""
    start = {c.url: c for c in before.instances}
    zero = InstanceCounters("", 0.0, 0.0, 0.0, 0.0)
    per_instance: list[dict[str, Any]] = []
    total_queries = total_hits = 0
    for c in after.instances:
        b = start.get(c.url, zero)
        queries = int(max(0.0, c.prefix_query_tokens - b.prefix_query_tokens))
        hits = int(max(0.0, c.prefix_hit_tokens - b.prefix_hit_tokens))
        total_queries += queries
        total_hits += hits
        per_instance.append(
            {
                "instance": c.url,
                "routed_requests": int(c.num_routed - b.num_routed),
                "num_finished": int(max(0.0, c.num_finished - b.num_finished)),
                "prefix_query_tokens": queries,
                "prefix_hit_tokens": hits,
                "prefix_hit_rate": _rate(hits, queries),
            }
        )
    return {
        "num_instances": len(per_instance),
        "router": after.router,
        "routed_requests": [p["routed_requests"] for p in per_instance],
        "prefix_hit_rate": _rate(total_hits, total_queries),
        "per_instance": per_instance,
    }


def request_shares(routed: Sequence[int]) -> list[float]:
    """Each instance's share of the requests routed."""
    total = sum(routed)
    return [n / total if total else 0.0 for n in routed]


def render_fleet_table(fleet: dict[str, Any], title: str = "fleet") -> Table:
    """One row per instance (requests routed, finished, its prefix hit rate from its
    own counters), then the fleet's."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    table = Table(title=f"{title} ({fleet['router']} router)")
    for header in ("instance", "routed", "share", "finished", "prefix hit rate"):
        table.add_column(header, justify="left" if header == "instance" else "right")
    shares = request_shares(fleet["routed_requests"])
    for row, share in zip(fleet["per_instance"], shares, strict=True):
        table.add_row(
            row["instance"],
            str(row["routed_requests"]),
            f"{share:.1%}",
            str(row["num_finished"]),
            rate(row["prefix_hit_rate"]),
        )
    table.add_row(
        "fleet",
        str(sum(fleet["routed_requests"])),
        "",
        str(sum(row["num_finished"] for row in fleet["per_instance"])),
        rate(fleet["prefix_hit_rate"]),
    )
    return table


__all__ = [
    "FleetCounters",
    "InstanceCounters",
    "fleet_figures",
    "render_fleet_table",
    "request_shares",
    "scrape_fleet",
]
