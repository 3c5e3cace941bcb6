"""Flags that subcommands share beyond the trace and config ones: SLOs, report outputs
(`replay`, `sweep`), the checkpoint to run (`replay`, `calibrate`, `serve`, `cluster`),
ports and counts (`serve`, `router`, `cluster`); the JSON report."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kvflow.cli.common import CLIError
from kvflow.request import SLO
from kvflow.traces.slo import SLOSettings, parse_tenant_slo

if TYPE_CHECKING:
    from kvflow.config import KVFlowConfig

DTYPES = ("float32", "float64", "float16", "bfloat16")
"""What ``--dtype`` takes (the names of `kvflow.engine_adapters.torch.spec.DTYPES`,
which imports torch)."""


REPORT_SCHEMA_VERSION = 1
"""The JSON report's `schema_version` (the README's "schema version 1"): keys are only
ever added; renaming or removing one would raise it."""


def port_number(text: str) -> int:
    """An argparse type: a TCP port in [0, 65535] (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (an SLO attainment target)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of ms, got {text!r}")
    return value


def _tenant_slo(text: str) -> tuple[str, SLO]:
    try:
        return parse_tenant_slo(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_slo_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ttft-slo-ms`, `--tpot-slo-ms`, `--tenant-slo`, `--slo-override`."""
    group = parser.add_argument_group(
        "SLOs",
        "Objectives for requests the trace gives none (per field); with --slo-override, "
        "for every request. A tenant's setting beats the global one.",
    )
    group.add_argument("--ttft-slo-ms", type=_positive_ms, metavar="MS", help="TTFT objective")
    group.add_argument("--tpot-slo-ms", type=_positive_ms, metavar="MS", help="TPOT objective")
    group.add_argument(
        "--tenant-slo",
        type=_tenant_slo,
        action="append",
        default=[],
        metavar="T=TTFT[,TPOT]",
        help="objectives in ms for tenant T, repeatable (either may be empty: t0=,50)",
    )
    group.add_argument(
        "--slo-override",
        action="store_true",
        help="replace the trace's SLOs instead of filling in missing ones",
    )


def slo_settings(args: argparse.Namespace) -> SLOSettings:
    """The SLO flags as settings to apply to the loaded trace."""
    per_tenant = dict(args.tenant_slo)
    if len(per_tenant) != len(args.tenant_slo):
        raise CLIError("--tenant-slo names the same tenant twice")
    return SLOSettings(args.ttft_slo_ms, args.tpot_slo_ms, per_tenant, args.slo_override)


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """`--model DIR` and `--dtype`, for the runners that load a checkpoint (torch, hf).

    Args:
        parser: the subcommand's parser.
        required: --model must be given; when not (a subcommand whose default engine
            needs no model), the help says the flags are for ``--engine torch|hf``.
    """
    engines = "" if required else " for --engine torch|hf"
    parser.add_argument(
        "--model", metavar="DIR", required=required, help=f"checkpoint directory{engines}"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help=f"compute dtype{engines} (default: bfloat16 on CUDA, float32 on CPU)",
    )


def check_engine_model(args: argparse.Namespace) -> None:
    """Fail before any work when `--model` does not fit `--engine` (torch and hf load it,
    sim serves none) or is not a directory."""
    if args.engine == "sim" and args.model:
        raise CLIError("--model is for --engine torch|hf; --engine sim serves no model")
    if args.engine != "sim" and not args.model:
        raise CLIError(f"--engine {args.engine} needs --model DIR")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} is not a directory")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--json OUT` and `--plot DIR`."""
    parser.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    parser.add_argument(
        "--plot", metavar="DIR", help="write PNG plots into DIR (needs the 'plot' extra)"
    )


def check_plot_dependency(args: argparse.Namespace) -> None:
    """Fail before any work when --plot is given and matplotlib is missing."""
    if args.plot:
        from kvflow.traces.plots import PlotDependencyError, require_matplotlib

        try:
            require_matplotlib()
        except PlotDependencyError as err:
            raise CLIError(f"--plot: {err}") from None


def check_report_outputs(
    args: argparse.Namespace,
    trace: Path,
    config: KVFlowConfig | None = None,
    more_inputs: Mapping[str, str | Path | None] | None = None,
) -> None:
    """Fail before any work when a report destination (`--json`, `--trace-events`,
    `--plot`) cannot be written or names an input (the trace, the config file, the
    latency preset file, `more_inputs`: a model's files, a prices file)."""
    from kvflow.cli.outputs import check_outputs

    check_outputs(
        files={"--json": args.json, "--trace-events": getattr(args, "trace_events", None)},
        directories={"--plot": args.plot},
        inputs={
            "the trace": trace,
            "the config file": args.config,
            "the latency preset file": config.sim.preset_file if config is not None else None,
            **(more_inputs or {}),
        },
    )


def fail_if_nothing_served(reasons: Mapping[str, str | None]) -> int:
    """Exit status 1 when a run served no request, after one `kvflow: error:` line per
    distinct reason naming the runs (by label) it applies to; 0 otherwise.

    Args:
        reasons: by run label (a policy, or a policy at some rates), why it served
            nothing (`kvflow.traces.outcome.nothing_served_reason`), None if it served.
    """
    runs_by_reason: dict[str, list[str]] = {}
    for run, reason in reasons.items():
        if reason is not None:
            runs_by_reason.setdefault(reason, []).append(run)
    for reason, runs in runs_by_reason.items():
        print(f"kvflow: error: no request served by {', '.join(runs)}: {reason}", file=sys.stderr)
    return 1 if runs_by_reason else 0


def sim_description(config: KVFlowConfig) -> str:
    """What the simulated runner stands for: its latency preset (named for the model and
    GPU it models) or preset file, and whether config fields adjust it."""
    sim = config.sim
    if sim.preset_file is not None:
        what = f"simulated, preset file {Path(sim.preset_file).name}"
    elif sim.preset is not None:
        what = f"simulated {sim.preset}"
    else:
        what = "simulated, own latency model"
    fields = ("fixed_ms", "prefill_token_us", "decode_seq_us", "kv_token_ns")
    if any(getattr(sim, name) is not None for name in fields):
        what += " (adjusted by sim.* settings)"
    return what


def report_console(args: argparse.Namespace, console: Console) -> Console:
    """Where tables and notes go: stderr when the JSON report takes stdout."""
    if args.json != "-":
        return console
    err = Console(stderr=True, highlight=False)
    if not err.is_terminal:
        err.width = max(err.width, 180)
    return err


def report_doc(
    path: Path, engine: str, config: KVFlowConfig, slo: SLOSettings, **results: Any
) -> dict[str, Any]:
    """The JSON report: `schema_version`, `trace` and `engine`, then `results` in the
    order given (the runs, or a sweep's points and capacities), then the `config` and
    `slo` used."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "trace": str(path),
        "engine": engine,
        **results,
        "config": config.model_dump(mode="json"),
        "slo": slo.to_json(),
    }


def write_json(doc: dict[str, Any], dest: str) -> None:
    """The report as indented JSON into the file `dest`, or stdout for '-'."""
    text = json.dumps(doc, indent=2)
    if dest == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        Path(dest).write_text(text + "\n")
    except OSError as err:  # a full disk, say: checked writable before the run
        raise CLIError(f"--json {dest}: cannot write the report: {err.strerror or err}") from None
