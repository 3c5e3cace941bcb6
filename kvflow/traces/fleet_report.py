"""The report of a fleet replay: fleet-wide figures (the instances' request states and
counters merged, through the single-instance `summarize_replay`) with per-instance
reports and the fleet's own figures under the `fleet` key."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.table import Table

from kvflow.cluster.fleet import FleetResult, InstanceResult
from kvflow.kv.store import StoreStats
from kvflow.scheduler.stats import SchedulerStats
from kvflow.traces.metrics import RunReport, summarize_replay
from kvflow.traces.replay import ReplayResult
from kvflow.traces.tables import render_run_table

_Stats = TypeVar("_Stats", SchedulerStats, StoreStats)


def peer_hit_tokens(result: FleetResult) -> list[int]:
    """Per instance, the prompt tokens its requests found cached because a pull from a
    peer brought them: of each pulled request's cached tokens at its first admission,
    those past what the instance held itself, at most the tokens pulled."""
    by_id = {s.request_id: s for inst in result.instances for s in inst.states}
    hits = [0] * len(result.instances)
    for pull in result.pulls:
        state = by_id.get(pull.request_id)
        if state is None:
            continue
        gained = state.num_cached_tokens - pull.num_local_tokens
        hits[pull.target] += max(0, min(gained, pull.num_tokens))
    return hits


def _with_peer_tier(stats: SchedulerStats, num_peer: int, landing_tier: str) -> SchedulerStats:
    """A copy of `stats` with `num_peer` hit tokens moved from the tier pulled blocks
    landed in to `peer`."""
    by_tier = dict(stats.hit_tokens_by_tier)
    by_tier[landing_tier] = by_tier.get(landing_tier, 0) - num_peer
    by_tier["peer"] = by_tier.get("peer", 0) + num_peer
    return dataclasses.replace(stats, hit_tokens_by_tier=by_tier)


def _without_handoff_hits(stats: SchedulerStats) -> SchedulerStats:
    """A decode instance's counters without its first-admission hits: those are the
    prompts handed to it, already counted (as queried, hit or not) on the prefill
    instance, so the fleet's hit rate stays the prefill instances'."""
    return dataclasses.replace(
        stats,
        prefix_hit_tokens=0,
        prefix_query_tokens=0,
        hit_tokens_by_tier=dict.fromkeys(stats.hit_tokens_by_tier, 0),
    )


def _merged_stats(stats: Sequence[SchedulerStats]) -> SchedulerStats:
    merged = SchedulerStats()
    merged.hit_tokens_by_tier = {}
    return _summed(stats, merged)


def _merged_store_stats(stats: Sequence[StoreStats]) -> StoreStats:
    return _summed(stats, StoreStats())


def _summed(stats: Sequence[Any], merged: _Stats) -> _Stats:
    """`merged` plus every one of `stats` (the same dataclass), field by field: numbers
    added, dicts added key by key."""
    for s in stats:
        for f in dataclasses.fields(merged):
            value = getattr(s, f.name)
            if isinstance(value, dict):
                total = getattr(merged, f.name)
                for key, amount in value.items():
                    total[key] = total.get(key, 0) + amount
            else:
                setattr(merged, f.name, getattr(merged, f.name) + value)
    return merged


def _instance_replay(
    inst: InstanceResult, stats: SchedulerStats, name: str, wall_s: float
) -> ReplayResult:
    return ReplayResult(
        policy=name,
        states=inst.states,
        stats=stats,
        store_stats=inst.store_stats,
        num_leaked_blocks=inst.num_leaked_blocks,
        end_time=inst.end_time,
        wall_s=wall_s,
    )


def run_name(result: FleetResult) -> str:
    """How a fleet run is named in tables and JSON: router/policy, `+peers` with peers."""
    name = f"{result.router}/{result.policy}{'+peers' if result.peers else ''}"
    if result.pd is not None:
        name += f"+pd{result.pd[0]}:{result.pd[1]}"
    return name


@dataclass(frozen=True, slots=True)
class FleetReport:
    """A fleet run's report: the fleet-wide `report` (whose `to_json()` carries the
    `fleet` key) and one report per instance."""

    report: RunReport
    instances: list[RunReport]

    def to_json(self) -> dict[str, Any]:
        """The fleet-wide report's JSON, without `wall_s` (here and per instance): the
        same trace, config and seed give the same bytes in any process."""
        return self.report.to_json(wall_clock=False)


def _peer_tier_stats(result: FleetResult, peer_hits: Sequence[int]) -> list[SchedulerStats]:
    """Each instance's counters with its peer hits as their own tier."""
    return [
        _with_peer_tier(inst.stats, peer_hits[inst.index], inst.landing_tier)
        for inst in result.instances
    ]


def _fleet_replay(result: FleetResult, stats: Sequence[SchedulerStats]) -> ReplayResult:
    """The fleet as one replay: every request's state and the instances' counters
    (`stats`) merged, a decode instance's without its handoff hits."""
    return ReplayResult(
        policy=run_name(result),
        states=result.states,
        stats=_merged_stats(
            [
                _without_handoff_hits(s) if inst.role == "decode" else s
                for inst, s in zip(result.instances, stats, strict=True)
            ]
        ),
        store_stats=_merged_store_stats([inst.store_stats for inst in result.instances]),
        num_leaked_blocks=sum(inst.num_leaked_blocks for inst in result.instances),
        end_time=result.end_time,
        wall_s=result.wall_s,
    )


def summarize_fleet_wide(result: FleetResult) -> RunReport:
    """`summarize_fleet(result).report` without the `fleet` figures: the fleet-wide
    report alone, one summary where `summarize_fleet` makes one per instance (and per
    role) as well (what a planner reads of each candidate fleet)."""
    stats = _peer_tier_stats(result, peer_hit_tokens(result))
    return summarize_replay(_fleet_replay(result, stats))


def summarize_fleet(result: FleetResult) -> FleetReport:
    """The fleet-wide report over every instance's requests and counters, with the
    fleet's figures under `extra["fleet"]`: instances, router, policy, peers, load
    imbalance, pulls, bytes over the network, peer hit tokens, requests routed to each
    instance, and each instance's report (`per_instance`, in instance order)."""
    name = run_name(result)
    peer_hits = peer_hit_tokens(result)
    stats = _peer_tier_stats(result, peer_hits)
    per_instance = [
        summarize_replay(
            _instance_replay(
                inst,
                s,
                f"{name}#{inst.index}{' ' + inst.role if inst.role else ''}",
                result.wall_s,
            )
        )
        for inst, s in zip(result.instances, stats, strict=True)
    ]
    fleet: dict[str, Any] = {
        "num_instances": len(result.instances),
        "router": result.router,
        "policy": result.policy,
        "peers": result.peers,
        "load_imbalance": result.load_imbalance,
        "request_imbalance": result.request_imbalance,
        "num_pulls": len(result.pulls),
        "network_bytes": result.network_bytes,
        "peer_hit_tokens": sum(peer_hits),
        "routed_requests": list(result.routed),
        "per_instance": [r.to_json(wall_clock=False) for r in per_instance],
        "pd": list(result.pd) if result.pd is not None else None,
        "roles": [inst.role for inst in result.instances],
        "pd_handoffs": len(result.handoffs),
        "pd_handoff_bytes": result.pd_handoff_bytes,
        "per_role": _per_role(result),
    }
    merged = summarize_replay(_fleet_replay(result, stats), extra={"fleet": fleet})
    return FleetReport(merged, per_instance)


def _per_role(result: FleetResult) -> dict[str, dict[str, Any]]:
    """With disaggregation, per role: its instances, requests served, steps, and the
    latency its half defines (TTFT on prefill, TPOT on decode, from its own states)."""
    if result.pd is None:
        return {}
    figures: dict[str, dict[str, Any]] = {}
    for role in ("prefill", "decode"):
        members = [inst for inst in result.instances if inst.role == role]
        report = summarize_replay(
            ReplayResult(
                policy=role,
                states=[s for inst in members for s in inst.states],
                stats=_merged_stats([inst.stats for inst in members]),
                store_stats=_merged_store_stats([inst.store_stats for inst in members]),
                num_leaked_blocks=sum(inst.num_leaked_blocks for inst in members),
                end_time=result.end_time,
                wall_s=result.wall_s,
            )
        )
        latency = report.ttft_ms if role == "prefill" else report.tpot_ms
        figures[role] = {
            "instances": [inst.index for inst in members],
            "num_requests": report.num_requests,
            "sim_steps": report.sim_steps,
            ("ttft_ms" if role == "prefill" else "tpot_ms"): dataclasses.asdict(latency),
        }
    return figures


def render_fleet_tables(
    reports: Sequence[FleetReport], width: int | None = None, title: str = "kvflow fleet"
) -> list[Table]:
    """The runs table (each fleet run's row followed by its instances' rows), fitted to
    `width`, and a table of the fleet figures."""
    rows: list[RunReport] = []
    for fr in reports:
        rows.append(fr.report)
        rows.extend(fr.instances)
    figures = Table(title="fleet")
    for header in (
        "run",
        "instances",
        "routed",
        "imbalance tokens / requests",
        "peer hits",
        "pulls",
        "network MiB",
        "pd handoffs",
        "handoff MiB",
    ):
        figures.add_column(header, justify="left" if header == "run" else "right")
    for fr in reports:
        fleet = fr.report.extra["fleet"]
        queried = fr.report.num_prompt_tokens
        figures.add_row(
            fr.report.policy,
            str(fleet["num_instances"]),
            " ".join(str(n) for n in fleet["routed_requests"]),
            f"{fleet['load_imbalance']:.2f} / {fleet['request_imbalance']:.2f}",
            f"{fleet['peer_hit_tokens'] / queried:.1%}" if queried else "-",
            str(fleet["num_pulls"]),
            f"{fleet['network_bytes'] / 2**20:.1f}",
            str(fleet["pd_handoffs"]) if fleet["pd"] else "-",
            f"{fleet['pd_handoff_bytes'] / 2**20:.1f}" if fleet["pd"] else "-",
        )
    return [render_run_table(rows, width, title=title), figures]
