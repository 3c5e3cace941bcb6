"""Terminal tables (rich): the runs compared, per tenant, per sweep point, and a fleet plan.

Each table fits a width: when its columns need more, the least important ones are left
out (the caption names them; the JSON report has every figure), so no cell is ever cut
or wrapped. Latencies of no request show as ``-``, never as 0.0.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from kvflow.traces.latency import LatencySummary
from kvflow.traces.metrics import RunReport, is_unknown
from kvflow.traces.sweep import DEFAULT_ATTAINMENT_TARGET, SweepPoint
from kvflow.traces.tenants import TenantReport

if TYPE_CHECKING:
    from kvflow.cluster.plan import FleetCost
    from kvflow.cluster.plan_search import LoadPlan, PricedPlan, SizePlan

R = TypeVar("R")

NO_FIGURE = "-"
"""What a cell shows for a figure that does not exist (a latency of no request)."""


@dataclass(frozen=True, slots=True)
class _Column(Generic[R]):
    header: str
    cell: Callable[[R], str]
    keep: int = 0
    """Left out, lowest first, when the table is too wide; 0: always shown."""
    left: bool = False


def _ms(value: float) -> str:
    """Milliseconds to 4 significant figures or 0.1 ms, whichever is coarser."""
    return f"{value:.0f}" if value >= 1000 else f"{value:.1f}"


def _p50_p99(summary: LatencySummary) -> str:
    if not summary.count:
        return NO_FIGURE
    return f"{_ms(summary.p50)} / {_ms(summary.p99)}"


def _one(summary: LatencySummary, percentile: str) -> str:
    return _ms(getattr(summary, percentile)) if summary.count else NO_FIGURE


def _share(value: float, num_served: int) -> str:
    """A fraction of served requests (SLO attainment): none served, no fraction."""
    return f"{value:.1%}" if num_served else NO_FIGURE


def _header_text(header: str) -> str:
    return " ".join(header.split())


def _natural_width(table: Table) -> int:
    """The width `table` takes when nothing limits it."""
    console = Console(width=10_000, file=io.StringIO())
    return Measurement.get(console, console.options, table).maximum


def _fit_table(
    title: str, columns: Sequence[_Column[R]], rows: Sequence[R], width: int | None
) -> Table:
    """A table of `rows` with as many of `columns` as fit in `width` (None: all),
    leaving out the lowest `keep` first."""
    shown = list(columns)
    left_out: list[_Column[R]] = []
    while True:
        table = Table(title=title, box=box.MINIMAL_HEAVY_HEAD, show_edge=False, pad_edge=False)
        for column in shown:
            table.add_column(column.header, justify="left" if column.left else "right")
        for row in rows:
            table.add_row(*(column.cell(row) for column in shown))
        droppable = [c for c in shown if c.keep]
        if width is None or not droppable or _natural_width(table) <= width:
            break
        victim = min(droppable, key=lambda c: c.keep)
        shown.remove(victim)
        left_out.append(victim)
    if left_out:
        names = ", ".join(_header_text(c.header) for c in reversed(left_out))
        table.caption = f"not shown at {width} columns: {names} (--json has every figure)"
    return table


# -- the runs compared --------------------------------------------------------------------
def _tier_split(report: RunReport) -> str:
    """First-admission hit tokens per tier, as shares of the prompt tokens looked up."""
    by_tier = report.extra.get("hit_tokens_by_tier") or {}
    hits = sum(by_tier.values())
    if not hits or not report.prefix_hit_rate:
        return NO_FIGURE
    queried = hits / report.prefix_hit_rate
    return "/".join(f"{by_tier.get(t, 0) / queried:.0%}" for t in ("device", "cpu", "disk"))


def _has_lower_tier_hits(report: RunReport) -> bool:
    by_tier = report.extra.get("hit_tokens_by_tier") or {}
    return bool(by_tier.get("cpu") or by_tier.get("disk"))


def _hit_rate(report: RunReport) -> str:
    return NO_FIGURE if is_unknown(report, "prefix_hit_rate") else f"{report.prefix_hit_rate:.1%}"


def _known(report: RunReport, name: str, value: int) -> str:
    """`value`, or no figure where the run could not know it (`is_unknown`)."""
    return NO_FIGURE if is_unknown(report, name) else str(value)


def _run_columns(reports: Sequence[RunReport]) -> list[_Column[RunReport]]:
    columns: list[_Column[RunReport]] = [
        _Column("policy", lambda r: r.policy, left=True),
        _Column("done/\ntotal", lambda r: f"{r.num_finished}/{r.num_requests}"),
    ]
    if any(r.num_rejected for r in reports):
        columns.append(_Column("rejected", lambda r: str(r.num_rejected), keep=8))
    columns += [
        _Column("TTFT ms\np50 / p99", lambda r: _p50_p99(r.ttft_ms)),
        _Column("TPOT ms\np50 / p99", lambda r: _p50_p99(r.tpot_ms), keep=10),
        _Column("ITL ms\np99", lambda r: _one(r.itl_ms, "p99"), keep=3),
        _Column("E2E ms\np50", lambda r: _one(r.e2e_ms, "p50"), keep=4),
        _Column("out\ntok/s", lambda r: f"{r.throughput_tokens_per_s:.0f}", keep=6),
        _Column("hit\nrate", _hit_rate),
    ]
    if any(_has_lower_tier_hits(r) for r in reports):
        columns.append(_Column("hit by tier\ndev/cpu/disk", _tier_split, keep=5))
    columns += [
        _Column("SLO\nmet", lambda r: _share(r.slo_attainment, r.num_finished)),
        _Column("goodput\nreq/s", lambda r: f"{r.goodput_rps:.2f}"),
        _Column("preempt", lambda r: _known(r, "num_preemptions", r.num_preemptions), keep=7),
        _Column("steps", lambda r: _known(r, "sim_steps", r.sim_steps), keep=2),
        _Column("wall s", lambda r: f"{r.wall_s:.2f}", keep=1),
    ]
    return columns


def render_run_table(
    reports: Sequence[RunReport], width: int | None = None, title: str = "kvflow runs"
) -> Table:
    """One row per run; columns left out, least important first, to fit `width`."""
    return _fit_table(title, _run_columns(reports), reports, width)


# -- per tenant ---------------------------------------------------------------------------
_TenantRow = tuple[str, str, TenantReport]


def render_tenant_table(reports: Sequence[RunReport], width: int | None = None) -> Table:
    """One row per (run, tenant), with queueing and KV-wait delays."""
    rows: list[_TenantRow] = [
        (report.policy, tenant, figures)
        for report in reports
        for tenant, figures in report.per_tenant.items()
    ]
    # A run that could not know a figure (a replay against a server) could not know it
    # per tenant either.
    unknown = {
        report.policy: {n for n in ("kv_wait_ms", "prefix_hit_rate") if is_unknown(report, n)}
        for report in reports
    }
    columns: list[_Column[_TenantRow]] = [
        _Column("policy", lambda row: row[0], left=True),
        _Column("tenant", lambda row: row[1], left=True),
        _Column("done/\ntotal", lambda row: f"{row[2].num_finished}/{row[2].num_requests}"),
    ]
    if any(row[2].num_rejected for row in rows):
        columns.append(_Column("rejected", lambda row: str(row[2].num_rejected), keep=6))
    columns += [
        _Column("TTFT ms\np50 / p99", lambda row: _p50_p99(row[2].ttft_ms)),
        _Column("TPOT ms\np50 / p99", lambda row: _p50_p99(row[2].tpot_ms), keep=5),
        _Column("queue ms\np50 / p99", lambda row: _p50_p99(row[2].queue_ms), keep=3),
        _Column(
            "KV wait\nms p99",
            lambda row: (
                NO_FIGURE if "kv_wait_ms" in unknown[row[0]] else _one(row[2].kv_wait_ms, "p99")
            ),
            keep=2,
        ),
        _Column(
            "hit\nrate",
            lambda row: (
                NO_FIGURE
                if "prefix_hit_rate" in unknown[row[0]]
                else f"{row[2].prefix_hit_rate:.1%}"
            ),
            keep=4,
        ),
        _Column("SLO\nmet", lambda row: _share(row[2].slo_attainment, row[2].num_finished)),
        _Column("goodput\nreq/s", lambda row: f"{row[2].goodput_rps:.2f}"),
    ]
    return _fit_table("per tenant", columns, rows, width)


# -- per sweep point ----------------------------------------------------------------------
def _sweep_columns(points: Sequence[SweepPoint]) -> list[_Column[SweepPoint]]:
    columns: list[_Column[SweepPoint]] = [
        _Column(
            "policy" if all(p.fleet is None for p in points) else "run",
            lambda p: p.label,
            left=True,
        ),
        _Column("rate\nreq/s", lambda p: f"{p.rate_rps:g}"),
        _Column("goodput\nreq/s", lambda p: f"{p.report.goodput_rps:.2f}"),
        _Column("SLO\nmet", lambda p: _share(p.report.slo_attainment, p.report.num_finished)),
        _Column("TTFT ms\np50 / p99", lambda p: _p50_p99(p.report.ttft_ms)),
        _Column("TPOT ms\np50 / p99", lambda p: _p50_p99(p.report.tpot_ms), keep=6),
        _Column("queue ms\np99", lambda p: _one(p.report.queue_ms, "p99"), keep=3),
        _Column("hit\nrate", lambda p: f"{p.report.prefix_hit_rate:.1%}", keep=5),
        _Column("preempt", lambda p: str(p.report.num_preemptions), keep=4),
        _Column("done/\ntotal", lambda p: f"{p.report.num_finished}/{p.report.num_requests}"),
    ]
    if any(p.report.num_rejected for p in points):
        columns.append(_Column("rejected", lambda p: str(p.report.num_rejected), keep=7))
    return columns


def render_sweep_table(
    points: Sequence[SweepPoint],
    capacity: Mapping[str, float | None] | None = None,
    attainment_target: float = DEFAULT_ATTAINMENT_TARGET,
    width: int | None = None,
) -> Table:
    """One row per sweep point, grouped by curve (a policy, or a policy on one fleet
    shape: `SweepPoint.label`); `capacity` (by curve, found with `attainment_target`)
    goes in the caption."""
    table = _fit_table(
        "kvflow sweep: goodput versus offered load", _sweep_columns(points), points, width
    )
    previous = None
    for i, point in enumerate(points):
        if previous is not None and point.label != previous:
            table.rows[i - 1].end_section = True
        previous = point.label
    if capacity:
        shown = ", ".join(
            f"{label} {'< lowest rate' if rate is None else f'{rate:g} req/s'}"
            for label, rate in capacity.items()
        )
        line = f"capacity (SLO met >= {attainment_target:.0%}): {shown}"
        table.caption = line if table.caption is None else f"{line}\n{table.caption}"
    return table


# -- a capacity plan ----------------------------------------------------------------------
PlanRow = tuple["PricedPlan", "LoadPlan"]


def _attainment(plan: SizePlan, below: bool) -> str:
    e = plan.below if below else plan.meeting
    return NO_FIGURE if e is None else f"{e.attainment:.1%}"


def _money(value: float | None, digits: int = 2) -> str:
    return NO_FIGURE if value is None else f"{value:,.{digits}f}"


def _fleet(plan: SizePlan) -> str:
    """`colocated`, or the split chosen (a fixed split's own when it missed)."""
    if not plan.pd:
        return "colocated"
    shown = plan.at(plan.max_instances) if plan.fixed else plan.meeting
    split = None if shown is None else shown.pd
    return "P:D" if split is None else f"{split[0]}P:{split[1]}D"


def _cheaper(row: PlanRow) -> str:
    which = row[1].cheaper()
    if which == "tie":
        return "tie"
    return "yes" if which == ("pd" if row[0].plan.pd else "colocated") else ""


def render_plan_table(loads: Sequence[LoadPlan], width: int | None = None) -> Table:
    """One row per load and kind of fleet (colocated; the P:D split when planned): the
    smallest fleet meeting the target, its cost, and what fails one instance below it
    (at --max-instances when no size met the target)."""

    def cost(row: PlanRow) -> FleetCost | None:
        return row[0].cost

    def size(row: PlanRow) -> str:
        plan = row[0].plan
        return f"> {plan.max_instances}" if plan.num_instances is None else str(plan.num_instances)

    def binding(row: PlanRow) -> str:
        below = row[0].plan.below
        return NO_FIGURE if below is None else below.binding_constraint()

    split = any(load.split is not None for load in loads)
    columns: list[_Column[PlanRow]] = [
        _Column("rate\nscale", lambda r: f"x{r[0].plan.rate_scale:g}", left=True),
        *([_Column("fleet", lambda r: _fleet(r[0].plan), left=True)] if split else []),
        _Column("instances", size),
        _Column("GPUs", lambda r: _money(None if (c := cost(r)) is None else c.num_gpus, 0)),
        _Column("$/hour", lambda r: _money(None if (c := cost(r)) is None else c.dollars_per_hour)),
        _Column(
            "$ per M\nout tokens",
            lambda r: _money(
                None if (c := cost(r)) is None else c.dollars_per_million_output_tokens, 3
            ),
        ),
        *([_Column("cheaper\n$/M", _cheaper)] if split else []),
        _Column(
            "goodput\nreq/$",
            lambda r: _money(None if (c := cost(r)) is None else c.goodput_per_dollar, 0),
            keep=4,
        ),
        _Column("SLO met\nat N", lambda r: _attainment(r[0].plan, below=False)),
        _Column("SLO met\nbelow", lambda r: _attainment(r[0].plan, below=True), keep=3),
        _Column("binding\nbelow", binding),
        _Column("fleets\nreplayed", lambda r: str(len(r[0].plan.evaluations)), keep=2),
        _Column("monotone", lambda r: "yes" if r[0].plan.monotone else "NO", keep=1),
    ]
    rows = [
        (answer, load)
        for load in loads
        for answer in (load.colocated, load.split)
        if answer is not None
    ]
    return _fit_table("kvflow plan: the smallest fleet per load", columns, rows, width)
