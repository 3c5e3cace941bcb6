"""`kvflow sweep`: goodput versus offered load, per policy and, with --instances, per
fleet size and router (capacity planning)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from kvflow.cli.common import (
    CLIError,
    add_config_arguments,
    add_trace_arguments,
    load_config,
    load_requests,
    parse_comma_list,
    trace_path,
)
from kvflow.cli.options import (
    add_output_arguments,
    add_slo_arguments,
    check_plot_dependency,
    check_report_outputs,
    fail_if_nothing_served,
    fraction,
    report_console,
    report_doc,
    sim_description,
    slo_settings,
    write_json,
)

if TYPE_CHECKING:
    from kvflow.config import KVFlowConfig
    from kvflow.traces.sweep import FleetShape, SweepPoint

DEFAULT_POLICIES = ("fcfs", "lpm")
SWEEP_PLOT = "sweep.png"


def _rates(text: str) -> list[float]:
    return parse_comma_list(
        text,
        float,
        lambda r: math.isfinite(r) and r > 0,
        malformed="expected rates like 1,2,4,8",
        invalid="expected positive rates like 1,2,4,8",
    )


def _instance_counts(text: str) -> list[int]:
    return parse_comma_list(
        text,
        int,
        lambda n: n >= 1,
        malformed="expected instance counts like 2,4,8",
        invalid="expected instance counts >= 1 like 2,4,8",
    )


def _router_names(text: str) -> list[str]:
    return parse_comma_list(
        text,
        str.strip,
        bool,
        malformed="expected router names like round-robin,cache-aware",
        invalid="expected router names like round-robin,cache-aware",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "sweep",
        help="goodput versus offered load per policy, replaying a grid in parallel",
        description="Replay a trace (the bundled sample when TRACE is omitted) rescaled to "
        "each --rate under each --policy, in parallel processes, and report goodput and "
        "SLO attainment versus rate, and each policy's capacity.",
    )
    add_trace_arguments(sp, rate_flag=False)  # --rate here is the sweep's list of rates
    sp.add_argument(
        "--policy",
        "-p",
        action="append",
        dest="policies",
        metavar="P",
        help=f"policy name, repeatable (default: {' '.join(DEFAULT_POLICIES)})",
    )
    sp.add_argument(
        "--rate",
        type=_rates,
        action="append",
        dest="sweep_rates",
        required=True,
        metavar="R1,R2,...",
        help="offered loads in requests/s (comma-separated, repeatable); the trace's "
        "arrivals are rescaled to each",
    )
    fleet = sp.add_argument_group("fleets (each point a fleet replay; the rate is the fleet's)")
    fleet.add_argument(
        "--instances",
        type=_instance_counts,
        action="append",
        dest="sweep_instances",
        metavar="N1,N2,...",
        help="fleet sizes to sweep (comma-separated, repeatable); default: one instance "
        "replayed alone",
    )
    fleet.add_argument(
        "--router",
        type=_router_names,
        action="append",
        dest="sweep_routers",
        metavar="R1,R2,...",
        help="routers to sweep with --instances (comma-separated, repeatable; default: "
        "router.name from the config)",
    )
    fleet.add_argument(
        "--peers",
        choices=["on", "off"],
        default="off",
        help="with --instances: instances pull prefixes from peers (default: off)",
    )
    sp.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="worker processes (default: one per grid point, at most one per CPU)",
    )
    sp.add_argument(
        "--attainment-target",
        type=fraction,
        default=0.9,
        metavar="F",
        help="SLO attainment a rate must keep to count as within capacity (default 0.9)",
    )
    add_config_arguments(sp)
    add_slo_arguments(sp)
    add_output_arguments(sp)
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cli.progress import ReplayProgress
    from kvflow.traces.sweep import capacity, jobs_for, sweep
    from kvflow.traces.tables import render_sweep_table

    config = load_config(args)
    names = args.policies or list(DEFAULT_POLICIES)
    rates = sorted({r for group in args.sweep_rates for r in group})
    fleets = _fleet_shapes(args, config)
    slo = slo_settings(args)
    check_plot_dependency(args)
    path = trace_path(args)
    check_report_outputs(args, path, config)
    out = report_console(args, console)
    loaded = load_requests(args)
    requests = slo.apply(loaded)
    num_points = len(names) * len(rates) * max(len(fleets), 1)
    jobs = jobs_for(args.jobs, num_points)
    with ReplayProgress(out) as progress:
        on_point = progress.counter(f"sweep ({jobs} jobs)", num_points)
        points = sweep(requests, config, names, rates, jobs=jobs, on_point=on_point, fleets=fleets)
    target = args.attainment_target
    capacities = capacity(points, target)
    table = render_sweep_table(points, capacities, target, width=out.width)
    table.title = (
        f"kvflow sweep: {path.name}, {len(requests)} requests | {sim_description(config)} "
        f"| SLOs: {slo.source(loaded)} | {jobs} job{'s' if jobs != 1 else ''}"
    )
    out.print(table)
    if args.plot:
        from kvflow.traces.plots import plot_sweep

        written = plot_sweep(points, Path(args.plot) / SWEEP_PLOT, target)
        out.print(f"wrote {written}")
    if args.json:
        doc = report_doc(
            path,
            "sim",
            config,
            slo,
            attainment_target=target,
            sweep=[p.to_json() for p in points],
            capacity=capacities,
        )
        write_json(doc, args.json)
    return fail_if_nothing_served(_unserved_by_label(points))


def _fleet_shapes(args: argparse.Namespace, config: KVFlowConfig) -> list[FleetShape]:
    """The fleets to sweep (instances x routers, in the given orders); none without
    --instances.

    Raises:
        CLIError: --router or --peers on without --instances.
        UnknownNameError: an unknown router.
    """
    from kvflow.cluster import routers
    from kvflow.traces.sweep import FleetShape

    if args.sweep_instances is None:
        if args.sweep_routers is not None or args.peers == "on":
            raise CLIError("kvflow sweep: --router and --peers need --instances N1,N2,...")
        return []
    counts = list(dict.fromkeys(n for group in args.sweep_instances for n in group))
    names = list(
        dict.fromkeys(r for group in args.sweep_routers or [[config.router.name]] for r in group)
    )
    for name in names:
        routers.create(name, config)  # fail on a bad name before replaying
    peers = args.peers == "on"
    return [FleetShape(n, name, peers) for n in counts for name in names]


def _unserved_by_label(points: list[SweepPoint]) -> dict[str, str | None]:
    """Why points served nothing, labelled "CURVE at R1, R2 req/s" per curve (a policy,
    or a policy on a fleet) and reason (for `fail_if_nothing_served`)."""
    rates: dict[tuple[str, str], list[str]] = {}
    for point in points:
        if point.nothing_served is not None:
            rates.setdefault((point.label, point.nothing_served), []).append(f"{point.rate_rps:g}")
    return {
        f"{label} at {', '.join(shown)} req/s": reason for (label, reason), shown in rates.items()
    }
