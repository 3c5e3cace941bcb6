"""`kvflow replay --endpoint URL`: replay a trace against an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from kvflow.cli.common import CLIError, load_requests, trace_path
from kvflow.cli.options import (
    REPORT_SCHEMA_VERSION,
    check_plot_dependency,
    check_report_outputs,
    report_console,
    slo_settings,
    write_json,
)


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """`--endpoint` and the flags that go with it."""
    group = parser.add_argument_group(
        "replaying against a server (--endpoint)",
        "Send the trace in real time to an OpenAI-compatible server (kvflow serve, vLLM, "
        "SGLang), streamed, each output of the trace's length (max_tokens, min_tokens, "
        "ignore_eos). --model NAME then names the served model (default: the first of "
        "GET /v1/models).",
    )
    group.add_argument(
        "--endpoint", metavar="URL", help="the server's base URL, e.g. http://127.0.0.1:8000"
    )
    group.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="which API to call (default: completions)",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, if set)",
    )
    group.add_argument(
        "--prompt-format",
        choices=["ids", "text"],
        help="send prompts as token ids (vLLM's and kvflow's completions take them) or as "
        "text built to the trace's lengths and prefixes (default: ids for completions, "
        "text for chat)",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        metavar="N",
        help="fold token ids into [0, N) for the server's vocabulary (default: 32000)",
    )


_LOCAL_ONLY = (
    ("policies", "--policy"),
    ("settings", "--set"),
    ("config", "--config"),
    ("dtype", "--dtype"),
    ("trace_events", "--trace-events"),
    ("check_integrity", "--check-integrity"),
)


def run_endpoint(args: argparse.Namespace, console: Console) -> int:
    """Replay the trace against `--endpoint` and print the report (the simulator's table
    and JSON document, `engine` "endpoint")."""
    from kvflow.cli.replay import print_reports
    from kvflow.traces.endpoint import (
        EndpointError,
        EndpointOptions,
        replay_endpoint,
        summarize_endpoint,
    )

    given = [flag for dest, flag in _LOCAL_ONLY if getattr(args, dest, None)]
    if args.engine != "sim":
        given.insert(0, "--engine")
    if given:
        raise CLIError(f"{', '.join(given)}: for a local engine, not with --endpoint")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise CLIError("--endpoint needs httpx: pip install 'kvflow[serve]'") from None
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    options = EndpointOptions(
        url=args.endpoint,
        model=args.model,
        api=args.api,
        prompt_format=args.prompt_format,
        api_key=api_key,
        vocab_size=args.vocab_size,
    )
    slo = slo_settings(args)
    check_plot_dependency(args)
    path = trace_path(args)
    check_report_outputs(args, path)
    out = report_console(args, console)
    loaded = load_requests(args)
    requests = slo.apply(loaded)
    out.print(f"replaying {len(requests)} requests in real time against {options.base_url} ...")
    try:
        result = replay_endpoint(requests, options)
    except EndpointError as err:
        raise CLIError(str(err)) from None
    report = summarize_endpoint(result)
    omitted = result.extra["omitted_fields"]
    if omitted:
        note = f"kvflow: note: the server refused {', '.join(omitted)}: sent without"
        if "ignore_eos" in omitted:
            note += " (outputs may end before the trace's lengths)"
        print(note, file=sys.stderr)
    what = f"{path.name}, {len(requests)} requests | {options.base_url} ({options.api})"
    print_reports(out, [report], f"{what} | SLOs: {slo.source(loaded)}")
    fleet = result.extra.get("fleet")
    if fleet is not None:  # a kvflow router: each instance's figures from its /metrics
        from kvflow.traces.endpoint_fleet import render_fleet_table

        out.print(
            render_fleet_table(fleet, f"{options.base_url}: {fleet['num_instances']} instances")
        )
    if result.num_failed:
        print(
            f"kvflow: warning: {result.num_failed} of {len(requests)} requests failed "
            f"({', '.join(f'{k}: {n}' for k, n in result.failures.items())}); "
            f"the first: {result.first_failure}",
            file=sys.stderr,
        )
    if args.plot:
        from kvflow.traces.plots import latency_cdfs, write_replay_plots

        cdfs = {report.policy: latency_cdfs(result.states)}
        written = write_replay_plots(Path(args.plot), cdfs, {})
        out.print(f"wrote {len(written)} plots to {args.plot}")
    if args.json:
        doc = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "trace": str(path),
            "engine": "endpoint",
            "endpoint": options.base_url,
            "model": result.model,
            "runs": [report.to_json()],
            "slo": slo.to_json(),
        }
        write_json(doc, args.json)
    return 0
