"""What several subcommands share: config and trace arguments, comma lists, the error type."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvflow.config import KVFlowConfig, parse_assignment
from kvflow.request import Request

T = TypeVar("T")


class CLIError(Exception):
    """An error to print as `kvflow: error: ...` with exit status 2."""


def parse_comma_list(
    text: str,
    convert: Callable[[str], T],
    is_valid: Callable[[T], bool],
    *,
    malformed: str,
    invalid: str,
) -> list[T]:
    """The comma-separated values of an argument (empty items ignored).

    Raises:
        argparse.ArgumentTypeError: ``"{malformed}, got TEXT"`` when a value does not
            convert, ``"{invalid}, got TEXT"`` when there is none or one is not valid.
    """
    try:
        values = [convert(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{malformed}, got {text!r}") from None
    if not values or not all(is_valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"{invalid}, got {text!r}")
    return values


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


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set KEY=VALUE`` overrides by dotted key."""
    return dict(parse_assignment(s) for s in args.settings)


def single_instance_overrides(
    args: argparse.Namespace,
    why: str = "this run has one instance (a fleet replay takes --instances N)",
) -> dict[str, Any]:
    """`config_overrides` for a command that configures one instance (or identical
    ones): an `instances.K.KEY` setting, which sets one instance of a fleet, is refused
    naming it and `why`, rather than left to fail as an unknown key.

    Raises:
        CLIError: an `instances.` setting.
    """
    overrides = config_overrides(args)
    for key in overrides:
        if key.startswith("instances."):
            raise CLIError(f"--set {key}: instances.K.KEY sets one instance of a fleet; {why}")
    return overrides


def load_config(args: argparse.Namespace) -> KVFlowConfig:
    """One instance's config: the file, then `--set` (`single_instance_overrides`)."""
    return KVFlowConfig.load(args.config, single_instance_overrides(args))


def add_trace_arguments(parser: argparse.ArgumentParser, *, rate_flag: bool = True) -> None:
    """TRACE and the flags that choose how it is read and shaped.

    Args:
        parser: the subcommand's parser.
        rate_flag: add ``--rate RPS`` (a subcommand with its own ``--rate``, such as a
            sweep over rates, passes False).
    """
    from kvflow.traces.formats import BUILTIN_FORMATS

    parser.add_argument("trace", nargs="?", help="trace file (default: the bundled sample)")
    read = parser.add_argument_group("reading the trace")
    read.add_argument(
        "--format",
        dest="trace_format",
        default="auto",
        metavar="NAME",
        help=f"trace format: auto (default: detect), {', '.join(BUILTIN_FORMATS)}",
    )
    read.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed records with a warning and a count instead of failing",
    )
    read.add_argument(
        "--namespace",
        metavar="NAME",
        help="Mooncake/Azure/BurstGPT: name that seeds synthesised tokens "
        "(default: the file name's stem; equal names share equal hash ids)",
    )
    read.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="ShareGPT: a locally installed transformers tokenizer (default: built-in)",
    )
    read.add_argument(
        "--session-rate",
        type=float,
        metavar="RPS",
        help="ShareGPT: conversations started per second (default: 1)",
    )
    read.add_argument(
        "--think-time",
        type=float,
        metavar="S",
        help="ShareGPT: seconds between a conversation's turns (default: 10)",
    )
    read.add_argument(
        "--keep-failed",
        action="store_true",
        help="BurstGPT/Azure: keep responses with 0 output tokens (as 1-token outputs)",
    )
    shape = parser.add_argument_group("shaping the workload (applied in this order)")
    shape.add_argument(
        "--window",
        metavar="START:END",
        help="only requests arriving START..END seconds after the first (either may be "
        "empty), shifted to start at 0",
    )
    shape.add_argument("--limit", type=int, metavar="N", help="only the first N requests")
    shape.add_argument(
        "--time-scale",
        type=float,
        metavar="F",
        help="multiply arrival offsets by F (0.5 replays twice as fast)",
    )
    if rate_flag:
        shape.add_argument(
            "--rate",
            type=float,
            dest="shape_rate_rps",
            metavar="RPS",
            help="rescale arrivals to a mean of RPS requests/s (not with --time-scale)",
        )


def trace_path(args: argparse.Namespace) -> Path:
    from kvflow.traces import bundled_sample_path

    return Path(args.trace) if args.trace else bundled_sample_path()


def trace_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `TraceOptions` fields the arguments set."""
    options: dict[str, Any] = {"skip_bad_lines": bool(getattr(args, "skip_bad_lines", False))}
    for field, dest in (
        ("namespace", "namespace"),
        ("tokenizer", "tokenizer"),
        ("session_rate_rps", "session_rate"),
        ("think_time_s", "think_time"),
    ):
        value = getattr(args, dest, None)
        if value is not None:
            options[field] = value
    if getattr(args, "keep_failed", False):
        options["keep_failed"] = True
    return options


def load_requests(args: argparse.Namespace) -> list[Request]:
    """The trace named by the arguments, read and shaped as they say. Skipped lines and
    left-out records are reported on stderr.

    Raises:
        TraceFormatError, ValueError: a bad trace or option (the CLI prints them).
    """
    from kvflow.traces import BadLinesSkippedWarning, read_trace
    from kvflow.traces.shaping import parse_window, shape

    path = trace_path(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadLinesSkippedWarning)  # reported below instead
        loaded = read_trace(path, getattr(args, "trace_format", "auto"), **trace_options(args))
    if loaded.num_bad_lines:
        print(
            f"kvflow: warning: skipped {loaded.num_bad_lines} bad line(s) of {path}; "
            f"first: {loaded.bad_line_errors[0]}",
            file=sys.stderr,
        )
    for reason, count in loaded.dropped.items():
        print(f"kvflow: note: left out {count} record(s) of {path}: {reason}", file=sys.stderr)
    if not loaded.requests:
        raise CLIError(f"no requests to replay: {path} holds none")
    window_text = getattr(args, "window", None)
    num_requests = getattr(args, "limit", None)
    shaped = shape(
        loaded.requests,
        window_s=parse_window(window_text) if window_text else None,
        num_requests=num_requests,
        scale=getattr(args, "time_scale", None),
        rate_rps=getattr(args, "shape_rate_rps", None),
    )
    if not shaped:  # only a window or a limit of 0 leaves none of a non-empty trace
        if num_requests == 0:
            raise CLIError("--limit 0 leaves no requests to replay")
        arrivals = [r.arrival_time for r in loaded.requests]
        raise CLIError(
            f"--window {window_text} leaves no requests to replay: the arrivals of {path} "
            f"span 0 to {max(arrivals) - min(arrivals):g} s after the first"
        )
    return shaped
