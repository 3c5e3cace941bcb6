"""`kvflow plan`: the smallest fleet that meets SLOs at each load, and what it costs."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kvflow.cli.common import (
    CLIError,
    add_config_arguments,
    add_trace_arguments,
    load_requests,
    parse_comma_list,
    single_instance_overrides,
    trace_path,
)
from kvflow.cli.options import (
    add_slo_arguments,
    check_report_outputs,
    fraction,
    report_console,
    report_doc,
    sim_description,
    slo_settings,
    write_json,
)

if TYPE_CHECKING:
    from kvflow.cluster.plan import FleetEvaluation, FleetSpec
    from kvflow.cluster.plan_search import Candidate, LoadPlan, PricedPlan, SizePlan
    from kvflow.cluster.prices import GpuPrice
    from kvflow.request import Request

DEFAULT_GPU = "h100"
DEFAULT_MAX_INSTANCES = 16


def _scales(text: str) -> list[float]:
    return parse_comma_list(
        text,
        float,
        lambda r: math.isfinite(r) and r > 0,
        malformed="expected rate scales like 1,2,4",
        invalid="expected positive rate scales like 1,2,4",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "plan",
        help="the smallest fleet meeting SLOs at each load, and its cost",
        description="For each --rate-scale (the trace's arrivals compressed by it), find "
        "the smallest number of colocated simulated instances whose fleet replay meets "
        "--attainment (the share of all requests meeting every SLO) by exponential search "
        "and bisection in parallel processes, and report GPUs, $/hour, $ per million "
        "output tokens, goodput per dollar and what fails one instance below. With --pd "
        "auto, also the smallest prefill/decode split P:D and its best ratio.",
    )
    add_trace_arguments(sp)
    plan = sp.add_argument_group("the plan")
    plan.add_argument(
        "--rate-scale",
        type=_scales,
        action="append",
        dest="rate_scales",
        metavar="S1,S2,...",
        help="loads to plan for, as multiples of the trace's rate (default: 1)",
    )
    plan.add_argument(
        "--attainment",
        type=fraction,
        default=0.9,
        metavar="F",
        help="share of all requests (rejected ones count as missed) that must meet every "
        "SLO (default 0.9)",
    )
    plan.add_argument(
        "--max-instances",
        type=int,
        default=DEFAULT_MAX_INSTANCES,
        metavar="N",
        help=f"largest fleet to consider (default {DEFAULT_MAX_INSTANCES})",
    )
    plan.add_argument("--router", metavar="R", help="router (default: router.name, cache-aware)")
    plan.add_argument("--policy", default="fcfs", metavar="P", help="policy (default: fcfs)")
    plan.add_argument(
        "--peers", choices=["on", "off"], default="off", help="peer pulls (default: off)"
    )
    plan.add_argument(
        "--pd",
        default="off",
        metavar="auto|off|P:D",
        help="prefill/decode disaggregation beside the colocated fleet: auto finds the "
        "smallest total P+D meeting --attainment and its best split (every split of "
        "each total searched: slower); P:D replays that split; off (default) plans "
        "colocated fleets only",
    )
    plan.add_argument(
        "--jobs", "-j", type=int, metavar="J", help="worker processes (default: CPU count)"
    )
    cost = sp.add_argument_group("prices")
    cost.add_argument(
        "--gpu", metavar="NAME", help=f"entry of the prices file (default: {DEFAULT_GPU})"
    )
    cost.add_argument(
        "--prices", metavar="FILE", help="prices TOML file (default: kvflow's example prices)"
    )
    cost.add_argument(
        "--price-per-hour",
        type=float,
        metavar="USD",
        help="USD per GPU-hour: overrides the --gpu entry's price; without --gpu, prices "
        "an instance simulated as the config says (e.g. --set sim.preset_file=FILE)",
    )
    cost.add_argument(
        "--gpus-per-instance",
        type=int,
        metavar="K",
        help="GPUs per instance with --price-per-hour (default: the entry's, or 1)",
    )
    add_config_arguments(sp)
    add_slo_arguments(sp)
    sp.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    sp.set_defaults(handler=run, plot=None)


def _gpu(args: argparse.Namespace) -> GpuPrice:
    import dataclasses

    from kvflow.cluster.prices import GpuPrice, load_prices, pick_gpu

    price, gpus = args.price_per_hour, args.gpus_per_instance
    if price is not None and not (math.isfinite(price) and price > 0):
        raise CLIError(f"--price-per-hour must be a number > 0, got {price!r}")
    if gpus is not None and gpus < 1:
        raise CLIError(f"--gpus-per-instance must be >= 1, got {gpus!r}")
    if gpus is not None and price is None:
        raise CLIError("--gpus-per-instance needs --price-per-hour")
    if price is not None and args.gpu is None and args.prices is None:
        return GpuPrice("custom", price, gpus or 1)
    prices = load_prices(args.prices)
    source = f"prices file {args.prices!r}" if args.prices else "kvflow's example prices"
    gpu = pick_gpu(prices, args.gpu or DEFAULT_GPU, source)
    if price is not None:
        gpu = dataclasses.replace(
            gpu, price_per_gpu_hour=price, gpus_per_instance=gpus or gpu.gpus_per_instance
        )
    return gpu


def _pd_mode(text: str) -> str | tuple[int, int]:
    """--pd: `auto`, `off`, or a fixed split (P, D)."""
    from kvflow.cli.fleet import parse_pd

    if text in ("auto", "off"):
        return text
    try:
        return parse_pd(text)
    except CLIError:
        raise CLIError(
            f"--pd: expected auto, off or P:D with P, D >= 1 (e.g. 1:3), got {text!r}"
        ) from None


def _most_fleets_per_round(max_instances: int, pd: str | tuple[int, int]) -> int:
    """The most fleets a search round can replay at once, so no more workers are
    started: every colocated size, or with `--pd auto` every split of every size."""
    from kvflow.cluster.plan_search import fleets_of

    splits = sum(len(fleets_of(n, pd=True)) for n in range(1, max_instances + 1))
    return max(max_instances, splits) if pd == "auto" else max_instances


def _plan_task(
    shared: tuple[Sequence[Request], FleetSpec, dict[float, list[Request]]],
    item: tuple[float, Candidate],
) -> FleetEvaluation:
    """Evaluate one fleet at one load. The trace at that load is kept (in the process's
    copy of `shared`) for the tasks after it: a search replays many fleets per load, one
    load at a time, and rescaling the trace (a new request each) cost ~5% of a replay."""
    from kvflow.cluster.plan import evaluate_fleet, scaled

    requests, spec, at_scale = shared
    scale, fleet = item
    if scale not in at_scale:
        at_scale.clear()  # the previous load is done with: keep one copy of the trace
        at_scale[scale] = scaled(requests, scale)
    return evaluate_fleet(at_scale[scale], spec, fleet.num_instances, scale, fleet.pd)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster import routers
    from kvflow.cluster.plan import FleetSpec
    from kvflow.cluster.plan_search import LoadPlan, evaluate_split, priced, search_size
    from kvflow.config import KVFlowConfig
    from kvflow.engine_adapters.simulated import latency_model_from_config
    from kvflow.policies import make_policy
    from kvflow.traces.sweep import ProcessRunner, jobs_for
    from kvflow.traces.tables import render_plan_table

    if args.max_instances < 1:
        raise CLIError(f"--max-instances must be >= 1, got {args.max_instances!r}")
    if args.jobs is not None and args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs!r}")
    pd = _pd_mode(args.pd)
    if pd == "auto" and args.max_instances < 2:
        raise CLIError(
            f"--pd auto needs --max-instances >= 2 (P:D fleets have P, D >= 1), "
            f"got {args.max_instances!r}"
        )
    gpu = _gpu(args)
    overrides = single_instance_overrides(args, "kvflow plan sizes fleets of identical instances")
    config = KVFlowConfig.load(args.config, {**gpu.config_overrides(), **overrides})
    spec = FleetSpec(config, args.router or config.router.name, args.policy, args.peers == "on")
    latency_model_from_config(config.sim)  # fail on a bad preset file before replaying
    routers.create(spec.router, config)
    make_policy(spec.policy, config)
    slo = slo_settings(args)
    path = trace_path(args)
    check_report_outputs(args, path, config, {"the prices file": args.prices})
    out = report_console(args, console)
    loaded = load_requests(args)
    requests = slo.apply(loaded)
    if not any(r.slo.ttft_ms or r.slo.tpot_ms or r.deadline is not None for r in requests):
        raise CLIError("a plan needs SLOs: give --ttft-slo-ms and/or --tpot-slo-ms")
    scales = sorted({s for group in args.rate_scales or [[1.0]] for s in group})
    jobs = jobs_for(args.jobs, _most_fleets_per_round(args.max_instances, pd))
    target = args.attainment
    plans: list[tuple[SizePlan, SizePlan | None]] = []
    with ProcessRunner((requests, spec, {}), jobs) as runner:
        for scale in scales:
            out.print(f"planning x{scale:g}: {len(requests)} requests, {jobs} job(s) ...")

            def evaluate(
                fleets: Sequence[Candidate], scale: float = scale
            ) -> list[FleetEvaluation]:
                return runner.map(_plan_task, [(scale, fleet) for fleet in fleets])

            colocated = search_size(evaluate, scale, target, args.max_instances, jobs)
            split = None
            if pd == "auto":  # from the colocated size: a split's answer is usually near
                hint = max(2, colocated.num_instances or args.max_instances)
                split = search_size(
                    evaluate, scale, target, args.max_instances, jobs, pd=True, hint=hint
                )
            elif isinstance(pd, tuple):
                split = evaluate_split(evaluate, scale, target, pd)
            plans.append((colocated, split))
    loads = [LoadPlan(priced(gpu, c), None if s is None else priced(gpu, s)) for c, s in plans]
    table = render_plan_table(loads, out.width)
    table.title = (
        f"kvflow plan: {path.name}, {len(requests)} requests | {gpu.name} "
        f"(${gpu.price_per_gpu_hour:g}/GPU-hour, {gpu.gpus_per_instance} GPU/instance) | "
        f"{sim_description(config)} | {spec.router} | SLOs: {slo.source(loaded)} | "
        f"SLO met >= {target:.0%}"
    )
    out.print(table)
    if args.json:
        doc = report_doc(
            path,
            "sim",
            config,
            slo,
            plan=_plan_json(loads, spec, gpu, target, args.max_instances, pd),
        )
        write_json(doc, args.json)
    return _verdict(loads, args.max_instances)


def _plan_json(
    loads: Sequence[LoadPlan],
    spec: FleetSpec,
    gpu: GpuPrice,
    target: float,
    max_instances: int,
    pd: str | tuple[int, int],
) -> dict[str, Any]:
    return {
        "gpu": {
            "name": gpu.name,
            "price_per_gpu_hour": gpu.price_per_gpu_hour,
            "gpus_per_instance": gpu.gpus_per_instance,
            "sim_preset": gpu.sim_preset,
            "device_blocks": gpu.device_blocks,
        },
        "attainment_target": target,
        "max_instances": max_instances,
        "router": spec.router,
        "policy": spec.policy,
        "peers": spec.peers,
        "pd_mode": pd if isinstance(pd, str) else f"{pd[0]}:{pd[1]}",
        "loads": [
            {
                "rate_scale": load.colocated.plan.rate_scale,
                **_answer_json(load.colocated),
                "pd": None if load.split is None else _answer_json(load.split),
                "cheaper": load.cheaper(),
            }
            for load in loads
        ],
    }


def _answer_json(answer: PricedPlan) -> dict[str, Any]:
    plan, cost = answer
    doc: dict[str, Any] = {"num_instances": plan.num_instances}
    if plan.pd:
        split = None if plan.meeting is None else plan.meeting.pd
        doc["split"] = None if split is None else list(split)
        doc["fixed"] = plan.fixed
    return {
        **doc,
        "cost": None if cost is None else cost.to_json(),
        "at_n": None if plan.meeting is None else plan.meeting.to_json(),
        "below": None if plan.below is None else plan.below.to_json(),
        "monotone": plan.monotone,
        "evaluations": [e.to_json() for e in plan.evaluations],
    }


def _split(e: FleetEvaluation) -> str:
    return "-" if e.pd is None else f"{e.pd[0]}:{e.pd[1]}"


def _verdict(loads: Sequence[LoadPlan], max_instances: int) -> int:
    """Exit status 1, after one `kvflow: error:` line per load and kind of fleet where
    no size met the target (or the fixed split missed it); a warning where the evaluated
    sizes were not monotone."""
    failed = 0
    for load in loads:
        for plan in (load.colocated.plan, None if load.split is None else load.split.plan):
            if plan is None:
                continue
            scale = f"x{plan.rate_scale:g}" + (": P:D" if plan.pd else "")
            if not plan.monotone:
                warn(
                    f"{scale}: SLO attainment was not monotone in the fleet sizes replayed; "
                    "the answer is the smallest size meeting the target above one that does not"
                )
            below = plan.below
            if plan.num_instances is not None or below is None:
                continue
            failed += 1
            missed = f"SLO attainment {below.attainment:.1%} < {plan.target:.0%}"
            why = f"most failures: {below.binding_constraint()}"
            if plan.fixed:
                error(f"x{plan.rate_scale:g}: --pd {_split(below)}: {missed} ({why})")
            else:
                best = f"best split {_split(below)}; " if plan.pd else ""
                error(
                    f"{scale}: {missed} even at --max-instances {max_instances} ({best}{why}); "
                    "raise --max-instances or relax the SLOs"
                )
    return 1 if failed else 0


def warn(message: str) -> None:
    print(f"kvflow: warning: {message}", file=sys.stderr)


def error(message: str) -> None:
    print(f"kvflow: error: {message}", file=sys.stderr)
