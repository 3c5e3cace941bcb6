"""Capacity planning: what one candidate fleet does at one load (its replay's SLO
attainment and what failed which SLO) and what it costs. The search over fleet sizes is
`kvflow.cluster.plan_search`.

Attainment here is the share of *all* requests that met every SLO: a request the fleet
rejected (it never fit in memory) counts as missed, unlike `RunReport.slo_attainment`
(met / served), so a fleet too small to hold the requests cannot look good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvflow.cluster.fleet import replay_identical_fleet
from kvflow.cluster.prices import GpuPrice
from kvflow.config import KVFlowConfig
from kvflow.request import FinishReason, Request
from kvflow.traces.fleet_report import summarize_fleet_wide
from kvflow.traces.outcome import SERVED, is_within, request_outcome
from kvflow.traces.shaping import time_scale


@dataclass(frozen=True, slots=True)
class FleetEvaluation:
    """One fleet replayed at one load."""

    rate_scale: float
    num_instances: int
    """All instances (P + D when split)."""
    num_requests: int
    num_met: int
    num_ttft_missed: int
    """Served requests over their TTFT objective (or deadline)."""
    num_tpot_missed: int
    num_unserved: int
    """Requests rejected or aborted (did not fit in memory)."""
    num_preemptions: int
    output_tokens_per_s: float
    goodput_rps: float
    pd: tuple[int, int] | None = None
    """(prefill, decode) instances when disaggregated; None: colocated."""

    @property
    def attainment(self) -> float:
        """Requests that met every SLO / all requests."""
        return self.num_met / self.num_requests if self.num_requests else 0.0

    def binding_constraint(self) -> str:
        """What failed most: ``ttft``, ``tpot`` or ``memory`` (requests not served);
        ``-`` when nothing failed."""
        counts = {
            "memory": self.num_unserved,
            "ttft": self.num_ttft_missed,
            "tpot": self.num_tpot_missed,
        }
        worst = max(counts, key=lambda k: counts[k])
        return worst if counts[worst] > 0 else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "num_instances": self.num_instances,
            "pd": None if self.pd is None else list(self.pd),
            "attainment": self.attainment,
            "num_requests": self.num_requests,
            "num_met": self.num_met,
            "num_ttft_missed": self.num_ttft_missed,
            "num_tpot_missed": self.num_tpot_missed,
            "num_unserved": self.num_unserved,
            "num_preemptions": self.num_preemptions,
            "output_tokens_per_s": self.output_tokens_per_s,
            "goodput_rps": self.goodput_rps,
            "binding_constraint": self.binding_constraint(),
        }


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What every candidate fleet shares (sent to each worker process once)."""

    config: KVFlowConfig
    router: str = "cache-aware"
    policy: str = "fcfs"
    peers: bool = False


def evaluate_fleet(
    requests: Sequence[Request],
    spec: FleetSpec,
    num_instances: int,
    rate_scale: float = 1.0,
    pd: tuple[int, int] | None = None,
) -> FleetEvaluation:
    """Replay `requests` (already at the load to plan for) on `num_instances` instances
    of `spec.config` (split `pd` = (P, D), P + D = `num_instances`, when given) and count
    what met its SLOs and what failed which."""
    result = replay_identical_fleet(
        requests, spec.config, num_instances, spec.policy, spec.router, peers=spec.peers, pd=pd
    )
    report = summarize_fleet_wide(result)
    ttft = tpot = unserved = 0
    for state in result.states:
        if state.finish_reason not in SERVED:
            unserved += state.finish_reason in (FinishReason.REJECTED, FinishReason.ABORTED)
            continue
        outcome = request_outcome(state)
        if outcome.met:
            continue
        slo, deadline = state.request.slo, state.request.deadline
        ttft_s, tpot_s = outcome.ttft_s, outcome.tpot_s
        if ttft_s is not None:  # the deadline bounds the first token's time, as TTFT does
            on_time = deadline is None or is_within(state.arrival_time + ttft_s, deadline)
            ttft += not (is_within(ttft_s * 1e3, slo.ttft_ms) and on_time)
        if tpot_s is not None:
            tpot += not is_within(tpot_s * 1e3, slo.tpot_ms)
    return FleetEvaluation(
        rate_scale=rate_scale,
        num_instances=num_instances,
        num_requests=report.num_requests,
        num_met=report.num_slo_met,
        num_ttft_missed=ttft,
        num_tpot_missed=tpot,
        num_unserved=unserved,
        num_preemptions=report.num_preemptions,
        output_tokens_per_s=report.throughput_tokens_per_s,
        goodput_rps=report.goodput_rps,
        pd=pd,
    )


def scaled(requests: Sequence[Request], rate_scale: float) -> list[Request]:
    """The trace's arrivals compressed by `rate_scale` (2: twice the offered rate)."""
    return time_scale(requests, 1.0 / rate_scale)


@dataclass(frozen=True, slots=True)
class FleetCost:
    """What a fleet of `num_instances` instances of one GPU entry costs."""

    num_instances: int
    num_gpus: int
    dollars_per_hour: float
    dollars_per_million_output_tokens: float | None
    """None when the fleet produced no tokens."""
    goodput_per_dollar: float
    """Requests meeting every SLO per dollar."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fleet_cost(gpu: GpuPrice, evaluation: FleetEvaluation) -> FleetCost:
    """The cost of the evaluated fleet at the rate its replay served output tokens."""
    n = evaluation.num_instances
    per_hour = n * gpu.price_per_instance_hour
    tokens_per_hour = evaluation.output_tokens_per_s * 3600.0
    return FleetCost(
        num_instances=n,
        num_gpus=n * gpu.gpus_per_instance,
        dollars_per_hour=per_hour,
        dollars_per_million_output_tokens=(
            per_hour / tokens_per_hour * 1e6 if tokens_per_hour > 0 else None
        ),
        goodput_per_dollar=evaluation.goodput_rps * 3600.0 / per_hour,
    )
