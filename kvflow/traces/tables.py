"""Terminal tables (rich) beyond the main one (`kvflow.traces.metrics.render_table`):
per tenant, and per sweep point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table

from kvflow.traces.metrics import RunReport
from kvflow.traces.sweep import DEFAULT_ATTAINMENT_TARGET, SweepPoint

_TENANT_COLUMNS = (
    "policy",
    "tenant",
    "done/requests",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "queue p50/p99 ms",
    "KV wait p99 ms",
    "hit rate",
    "SLO met",
    "goodput/s",
)
_SWEEP_COLUMNS = (
    "policy",
    "rate req/s",
    "goodput/s",
    "SLO met",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "queue p99 ms",
    "hit rate",
    "preempt",
    "done/rejected",
)


def _pair(p50: float, p99: float) -> str:
    return f"{p50:.1f} / {p99:.1f}"


def render_tenant_table(reports: Sequence[RunReport]) -> Table:
    """One row per (run, tenant), with queueing and KV-wait delays."""
    table = Table(title="per tenant")
    for header in _TENANT_COLUMNS:
        table.add_column(header, justify="left" if header in ("policy", "tenant") else "right")
    for report in reports:
        for tenant, figures in report.per_tenant.items():
            table.add_row(
                report.policy,
                tenant,
                f"{figures.num_finished}/{figures.num_requests}",
                _pair(figures.ttft_ms.p50, figures.ttft_ms.p99),
                _pair(figures.tpot_ms.p50, figures.tpot_ms.p99),
                _pair(figures.queue_ms.p50, figures.queue_ms.p99),
                f"{figures.kv_wait_ms.p99:.1f}",
                f"{figures.prefix_hit_rate:.1%}",
                f"{figures.slo_attainment:.1%}",
                f"{figures.goodput_rps:.2f}",
            )
    return table


def render_sweep_table(
    points: Sequence[SweepPoint],
    capacity: Mapping[str, float | None] | None = None,
    attainment_target: float = DEFAULT_ATTAINMENT_TARGET,
) -> Table:
    """One row per sweep point, grouped by policy; `capacity` (by policy, found with
    `attainment_target`) goes in the caption."""
    table = Table(title="kvflow sweep: goodput versus offered load")
    for header in _SWEEP_COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    previous = None
    for point in points:
        report = point.report
        if previous is not None and point.policy != previous:
            table.add_section()
        previous = point.policy
        table.add_row(
            point.policy,
            f"{point.rate_rps:g}",
            f"{report.goodput_rps:.2f}",
            f"{report.slo_attainment:.1%}",
            _pair(report.ttft_ms.p50, report.ttft_ms.p99),
            _pair(report.tpot_ms.p50, report.tpot_ms.p99),
            f"{report.queue_ms.p99:.1f}",
            f"{report.prefix_hit_rate:.1%}",
            str(report.num_preemptions),
            f"{report.num_finished}/{report.num_rejected}",
        )
    if capacity:
        shown = ", ".join(
            f"{policy} {'< lowest rate' if rate is None else f'{rate:g} req/s'}"
            for policy, rate in capacity.items()
        )
        table.caption = f"capacity (SLO met >= {attainment_target:.0%}): {shown}"
    return table
