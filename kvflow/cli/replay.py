"""`kvflow replay`: replay a trace under one or more policies and compare them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from kvflow.cli.common import (
    add_config_arguments,
    add_trace_arguments,
    load_config,
    load_requests,
    trace_path,
)

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
    rp.add_argument("--engine", choices=["sim"], default="sim", help="runner (default: sim)")
    add_config_arguments(rp)
    rp.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    rp.add_argument(
        "--check-integrity",
        action="store_true",
        help="check scheduler and store invariants after every step (slow)",
    )
    rp.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.traces.metrics import render_table, summarize
    from kvflow.traces.replay import make_policy, replay

    config = load_config(args)
    names = args.policies or list(DEFAULT_POLICIES)
    made = [make_policy(name, config) for name in names]  # fail on a bad name before replaying
    path = trace_path(args)
    requests = load_requests(args)
    reports = []
    for name, policy in zip(names, made, strict=True):
        result = replay(requests, config, policy, check_integrity=args.check_integrity)
        reports.append(
            summarize(
                result.states,
                policy=name,
                num_preemptions=result.stats.num_preemptions,
                prefix_hit_tokens=result.stats.prefix_hit_tokens,
                prefix_query_tokens=result.stats.prefix_query_tokens,
                sim_steps=result.stats.num_steps,
                num_leaked_blocks=result.num_leaked_blocks,
                wall_s=result.wall_s,
            )
        )
    table = render_table(reports)
    table.title = f"kvflow replay: {path.name} ({len(requests)} requests, engine {args.engine})"
    console.print(table)
    if args.json:
        doc: dict[str, Any] = {
            "trace": str(path),
            "engine": args.engine,
            "runs": [r.to_json() for r in reports],
            "config": config.model_dump(mode="json"),
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n")
    return 0
