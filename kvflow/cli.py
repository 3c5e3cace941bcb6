"""`kvflow replay | policies`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from kvflow import policies
from kvflow.config import ConfigError, KVFlowConfig, parse_assignment
from kvflow.policies import PolicyLoadError
from kvflow.registry import UnknownNameError

DEFAULT_POLICIES = ("fcfs", "lpm", "edf", "priority", "fair")


class CLIError(Exception):
    """An error to print as `kvflow: error: ...` with exit status 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvflow",
        description="Cache-aware LLM request scheduling: replay traces under policies.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rp = sub.add_parser(
        "replay",
        help="replay a trace in virtual time under one or more policies",
        description="Replay a trace (the bundled sample when TRACE is omitted) under each "
        "--policy and print one table comparing them.",
    )
    rp.add_argument("trace", nargs="?", help="trace file (default: the bundled sample)")
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
    rp.add_argument("--config", metavar="FILE", help="JSON or TOML config file")
    rp.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. scheduler.max_num_seqs=64",
    )
    rp.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    rp.add_argument(
        "--check-integrity",
        action="store_true",
        help="check scheduler and store invariants after every step (slow)",
    )

    sub.add_parser("policies", help="list every policy the registry can load, plugins included")
    return parser


def _load_config(args: argparse.Namespace) -> KVFlowConfig:
    overrides = dict(parse_assignment(s) for s in args.settings)
    return KVFlowConfig.load(args.config, overrides)


def cmd_replay(args: argparse.Namespace, console: Console) -> int:
    from kvflow.traces import bundled_sample_path, load_trace
    from kvflow.traces.metrics import render_table, summarize
    from kvflow.traces.replay import make_policy, replay

    config = _load_config(args)
    names = args.policies or list(DEFAULT_POLICIES)
    made = [make_policy(name, config) for name in names]  # fail on a bad name before replaying
    trace_path = Path(args.trace) if args.trace else bundled_sample_path()
    requests = load_trace(trace_path)
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
    table.title = (
        f"kvflow replay: {trace_path.name} ({len(requests)} requests, engine {args.engine})"
    )
    console.print(table)
    if args.json:
        doc: dict[str, Any] = {
            "trace": str(trace_path),
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


def cmd_policies(args: argparse.Namespace, console: Console) -> int:
    for name in policies.names():
        source = policies.registry.source(name)
        try:
            factory = policies.load(name)
            doc = (factory.__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
        except Exception as err:  # a broken plugin is listed with its error, not fatal
            summary = f"(fails to load: {type(err).__name__}: {err})"
        console.print(f"{name:<14} {source:<10} {summary}", highlight=False, soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 180)  # no wrapped cells in logs and pipes
    commands = {"replay": cmd_replay, "policies": cmd_policies}
    try:
        return commands[args.command](args, console)
    except (CLIError, ConfigError, UnknownNameError, PolicyLoadError, ValueError, OSError) as err:
        print(f"kvflow: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
