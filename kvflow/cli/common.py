"""What several subcommands share: config and trace arguments, and the error type."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvflow.config import KVFlowConfig, parse_assignment
from kvflow.request import Request


class CLIError(Exception):
    """An error to print as `kvflow: error: ...` with exit status 2."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. scheduler.max_num_seqs=64",
    )


def load_config(args: argparse.Namespace) -> KVFlowConfig:
    overrides = dict(parse_assignment(s) for s in args.settings)
    return KVFlowConfig.load(args.config, overrides)


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", nargs="?", help="trace file (default: the bundled sample)")


def trace_path(args: argparse.Namespace) -> Path:
    from kvflow.traces import bundled_sample_path

    return Path(args.trace) if args.trace else bundled_sample_path()


def load_requests(args: argparse.Namespace) -> list[Request]:
    """The trace named by the arguments, loaded (and later shaped) as they say."""
    from kvflow.traces import load_trace

    return load_trace(trace_path(args))
