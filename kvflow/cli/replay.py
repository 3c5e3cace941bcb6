"""`kvflow replay`: replay a trace under one or more policies and compare them."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kvflow.cli.common import (
    CLIError,
    add_config_arguments,
    add_trace_arguments,
    load_config,
    load_requests,
    single_instance_overrides,
    trace_path,
)
from kvflow.cli.endpoint import add_endpoint_arguments, run_endpoint
from kvflow.cli.fleet import add_fleet_arguments, run_fleet
from kvflow.cli.options import (
    add_model_arguments,
    add_output_arguments,
    add_slo_arguments,
    check_plot_dependency,
    check_report_outputs,
    fail_if_nothing_served,
    report_console,
    report_doc,
    sim_description,
    slo_settings,
    write_json,
)
from kvflow.cli.outputs import model_files

if TYPE_CHECKING:
    from kvflow.traces.metrics import RunReport
    from kvflow.traces.trace_events import TraceEventWriter

DEFAULT_POLICIES = ("fcfs", "lpm", "edf", "priority", "fair")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rp = sub.add_parser(
        "replay",
        help="replay a trace in virtual time under one or more policies",
        description="Replay a trace (the bundled sample when TRACE is omitted) under each "
        "--policy and print one table comparing them.",
    )
    add_trace_arguments(rp)
    rp.add_argument(
        "--policy",
        "-p",
        action="append",
        dest="policies",
        metavar="P",
        help=f"policy name, repeatable (default: {' '.join(DEFAULT_POLICIES)}); "
        "see `kvflow policies`",
    )
    rp.add_argument(
        "--engine",
        choices=["sim", "torch", "hf"],
        default="sim",
        help="runner (default: sim, in virtual time); torch or hf run --model in wall-clock "
        "time through the async engine (arrivals at their offsets; scale them with "
        "--time-scale; default policy fcfs)",
    )
    add_model_arguments(rp, required=False)
    add_config_arguments(rp)
    add_slo_arguments(rp)
    add_output_arguments(rp)
    rp.add_argument(
        "--trace-events",
        metavar="FILE",
        help="write the step timeline as Chrome/Perfetto trace-event JSON (one track per policy)",
    )
    rp.add_argument(
        "--check-integrity",
        action="store_true",
        help="check scheduler and store invariants after every step (slow)",
    )
    add_endpoint_arguments(rp)
    add_fleet_arguments(rp)
    rp.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cli.progress import ReplayProgress
    from kvflow.traces.metrics import summarize_replay
    from kvflow.traces.outcome import nothing_served_reason
    from kvflow.traces.replay import make_policy, replay
    from kvflow.traces.timeseries import TimeSeriesRecorder, chain_hooks

    if args.endpoint:
        return run_endpoint(args, console)
    if args.engine == "sim" and args.model:
        raise CLIError(
            "--model is for --engine torch|hf (or --endpoint's model name); --engine sim "
            "replays the latency preset, no model"
        )
    if args.instances is not None or args.routers or args.peers == "on" or args.pd:
        return run_fleet(args, console)
    if args.engine != "sim":
        return run_real(args, console)
    config = load_config(args)
    names = args.policies or list(DEFAULT_POLICIES)
    made = [make_policy(name, config) for name in names]  # fail on a bad name before replaying
    slo = slo_settings(args)
    check_plot_dependency(args)
    path = trace_path(args)
    check_report_outputs(args, path, config)
    out = report_console(args, console)
    loaded = load_requests(args)
    requests = slo.apply(loaded)
    reports = []
    unserved: dict[str, str | None] = {}
    cdfs: dict[str, Any] = {}
    series: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        events = stack.enter_context(step_timeline(args.trace_events))
        progress = stack.enter_context(ReplayProgress(out))
        for name, policy in zip(names, made, strict=True):
            recorder = TimeSeriesRecorder() if args.plot else None
            hook = chain_hooks(
                [
                    progress.replay_hook(name, requests),
                    recorder.on_step if recorder is not None else None,
                    events.track(name) if events is not None else None,
                ]
            )
            result = replay(
                requests, config, policy, check_integrity=args.check_integrity, on_step=hook
            )
            progress.finish_all()
            reports.append(summarize_replay(result, policy=name))
            unserved[name] = nothing_served_reason(result.states, config)
            if recorder is not None:
                from kvflow.traces.plots import latency_cdfs

                cdfs[name] = latency_cdfs(result.states)
                series[name] = recorder.series()
    what = f"{path.name}, {len(requests)} requests | {sim_description(config)}"
    print_reports(out, reports, f"{what} | SLOs: {slo.source(loaded)}")
    if args.plot:
        from kvflow.traces.plots import write_replay_plots

        written = write_replay_plots(Path(args.plot), cdfs, series)
        out.print(f"wrote {len(written)} plots to {args.plot}")
    if args.trace_events:
        out.print(f"wrote the step timeline to {args.trace_events}")
    if args.json:
        doc = report_doc(path, args.engine, config, slo, runs=[r.to_json() for r in reports])
        write_json(doc, args.json)
    return fail_if_nothing_served(unserved)


@contextlib.contextmanager
def step_timeline(path: str | None) -> Iterator[TraceEventWriter | None]:
    """The `--trace-events` writer (None without one), closed on the way out. Its
    writes (opening, each replay's hook, closing) are what can raise its
    `TimelineWriteError`, a `CLIError` naming the option here."""
    from kvflow.traces.trace_events import TimelineWriteError, TraceEventWriter

    if not path:
        yield None
        return
    try:
        with TraceEventWriter(path) as events:
            yield events
    except TimelineWriteError as err:
        raise CLIError(
            f"--trace-events {err.filename}: cannot write the step timeline: {err.strerror}"
        ) from None


def print_reports(out: Console, reports: list[RunReport], title: str) -> None:
    """The comparison table (and the per-tenant one when there are tenants), fitted to
    the console's width."""
    from kvflow.traces.tables import render_run_table, render_tenant_table

    out.print(render_run_table(reports, out.width, title=f"kvflow replay: {title}"))
    if any(len(r.per_tenant) > 1 for r in reports):
        out.print(render_tenant_table(reports, out.width))


def run_real(args: argparse.Namespace, console: Console) -> int:
    """`--engine torch|hf`: each policy in wall-clock time through the async engine,
    over a fresh store and cache (the model is loaded once)."""
    from kvflow.engine_adapters.factory import build_runner, load_model
    from kvflow.traces.metrics import summarize_replay
    from kvflow.traces.outcome import nothing_served_reason
    from kvflow.traces.realtime import fit_to_vocab, replay_realtime
    from kvflow.traces.replay import make_policy

    if not args.model:
        raise CLIError(f"--engine {args.engine} needs --model DIR")
    if args.plot or args.trace_events or args.check_integrity:
        raise CLIError("--plot, --trace-events and --check-integrity need --engine sim")
    settings = single_instance_overrides(args)
    names = args.policies or ["fcfs"]
    slo = slo_settings(args)
    path = trace_path(args)
    check_report_outputs(args, path, more_inputs=model_files(args.model))
    out = report_console(args, console)
    loaded = load_requests(args)  # an empty trace fails before the model loads
    model = load_model(args.model, args.engine, args.dtype)
    # Longer requests than the model's positions are rejected, as a server would.
    settings.setdefault("scheduler.max_model_len", model.max_position_embeddings)
    requests = fit_to_vocab(slo.apply(loaded), model.vocab_size)
    reports = []
    unserved: dict[str, str | None] = {}
    config = None
    for name in names:
        config, runner, store = build_runner(model, settings, config_file=args.config)
        policy = make_policy(name, config)
        out.print(f"replaying {len(requests)} requests in real time under {name} ...")
        try:
            result = replay_realtime(requests, config, policy, runner, store)
        finally:
            store.close()
        reports.append(summarize_replay(result, policy=name))
        unserved[name] = nothing_served_reason(result.states, config)
    what = f"{path.name}, {len(requests)} requests | {args.engine} runner, {args.model}"
    print_reports(out, reports, f"{what} on {model.device} | SLOs: {slo.source(loaded)}")
    if args.json and config is not None:
        doc = report_doc(
            path,
            args.engine,
            config,
            slo,
            model=str(args.model),
            device=str(model.device),
            runs=[r.to_json() for r in reports],
        )
        write_json(doc, args.json)
    return fail_if_nothing_served(unserved)
