"""The command line: `kvflow replay | policies | ...`. Each subcommand is a module with
`add_parser(sub)` that registers its parser with a `handler(args, console) -> int`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from kvflow.cli import calibrate as calibrate_cmd
from kvflow.cli import cluster as cluster_cmd
from kvflow.cli import plan as plan_cmd
from kvflow.cli import policies as policies_cmd
from kvflow.cli import replay as replay_cmd
from kvflow.cli import router as router_cmd
from kvflow.cli import serve as serve_cmd
from kvflow.cli import sweep as sweep_cmd
from kvflow.cli import synth as synth_cmd
from kvflow.cli.common import CLIError
from kvflow.config import ConfigError
from kvflow.policies import PolicyLoadError
from kvflow.registry import PluginLoadError, UnknownNameError

SUBCOMMANDS = (
    replay_cmd,
    sweep_cmd,
    plan_cmd,
    synth_cmd,
    calibrate_cmd,
    serve_cmd,
    router_cmd,
    cluster_cmd,
    policies_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvflow",
        description="Cache-aware LLM request scheduling: replay traces under policies.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 180)  # no wrapped cells in logs and pipes
    try:
        code: int = args.handler(args, console)
        return code
    except (
        CLIError,
        ConfigError,
        UnknownNameError,
        PluginLoadError,
        PolicyLoadError,
        ValueError,
        OSError,
    ) as err:
        print(f"kvflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what the command started is stopped by now
        print("kvflow: interrupted", file=sys.stderr)
        return 130


__all__ = ["CLIError", "build_parser", "main"]
