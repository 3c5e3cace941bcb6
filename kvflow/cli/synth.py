"""`kvflow synth`: write a synthetic workload as a trace file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from kvflow.cli.common import CLIError
from kvflow.cli.outputs import check_outputs

if TYPE_CHECKING:
    from kvflow.traces.synthetic import TenantSpec


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "synth",
        help="write a synthetic workload (Poisson/gamma arrivals, sessions, tenants) as a trace",
        description="Generate a deterministic synthetic workload and write it as a kvflow "
        "native trace (or a Mooncake trace). Lengths are N, LO:HI, "
        "lognormal:MEDIAN:SIGMA[:MAX] or trace:PATH (sampled from a trace file).",
    )
    sp.add_argument("out", metavar="OUT", help="the trace file to write")
    sp.add_argument(
        "-n",
        "--sessions",
        "--requests",
        dest="num_sessions",
        type=int,
        default=100,
        metavar="N",
        help="sessions to generate; with one turn each, the number of requests (default: 100)",
    )
    sp.add_argument(
        "--arrival",
        choices=["poisson", "gamma", "none"],
        default="poisson",
        help="session arrivals: poisson, gamma (bursty, see --cv) or none (all at t=0)",
    )
    sp.add_argument(
        "--rate", type=float, default=1.0, metavar="RPS", help="sessions per second (default: 1)"
    )
    sp.add_argument(
        "--cv",
        type=float,
        default=2.0,
        help="gamma arrivals: coefficient of variation of the gaps (default: 2; 1 = Poisson)",
    )
    sp.add_argument(
        "--prompt-len",
        default="lognormal:256:1:8192",
        metavar="LEN",
        help="user tokens per turn (default: lognormal:256:1:8192)",
    )
    sp.add_argument(
        "--output-len",
        default="lognormal:128:0.8:2048",
        metavar="LEN",
        help="output tokens per turn (default: lognormal:128:0.8:2048)",
    )
    sp.add_argument("--turns", default="1", metavar="LEN", help="turns per session (default: 1)")
    sp.add_argument(
        "--think-time",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between the turns of a session (default: 10)",
    )
    sp.add_argument(
        "--system-prompts",
        type=int,
        default=0,
        metavar="G",
        help="shared system prompts; each session opens with one (default: 0)",
    )
    sp.add_argument(
        "--system-prompt-len", type=int, default=1024, metavar="N", help="(default: 1024)"
    )
    sp.add_argument(
        "--system-prompt-skew",
        type=float,
        default=0.0,
        metavar="S",
        help="Zipf exponent of system prompt popularity (default: 0, uniform)",
    )
    sp.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="NAME[,weight=W][,ttft_ms=T][,tpot_ms=T][,priority=P]",
        help="a tenant, repeatable (default: one tenant 'default' without SLOs)",
    )
    sp.add_argument("--seed", type=int, default=0, help="(default: 0)")
    sp.add_argument(
        "--format",
        dest="out_format",
        choices=["native", "mooncake"],
        default="native",
        help="trace format to write (default: native)",
    )
    sp.set_defaults(handler=run)


def parse_tenant(text: str) -> TenantSpec:
    """A `TenantSpec` from ``NAME[,weight=W][,ttft_ms=T][,tpot_ms=T][,priority=P]``."""
    from kvflow.request import SLO
    from kvflow.traces.synthetic import TenantSpec

    name, *pairs = text.split(",")
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in ("weight", "ttft_ms", "tpot_ms", "priority"):
            raise CLIError(
                f"bad --tenant {text!r}: expected NAME[,weight=W][,ttft_ms=T][,tpot_ms=T]"
                "[,priority=P]"
            )
        values[key.strip()] = value
    try:
        ttft, tpot = values.get("ttft_ms"), values.get("tpot_ms")
        return TenantSpec(
            name=name.strip(),
            weight=float(values.get("weight", 1.0)),
            slo=SLO(
                ttft_ms=None if ttft is None else float(ttft),
                tpot_ms=None if tpot is None else float(tpot),
            ),
            priority=int(values.get("priority", 0)),
        )
    except ValueError as err:
        raise CLIError(f"bad --tenant {text!r}: {err}") from None


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.traces.distributions import (
        AllAtOnce,
        ArrivalProcess,
        Gamma,
        Poisson,
        length_trace_path,
        parse_length,
    )
    from kvflow.traces.formats.mooncake import MOONCAKE_BLOCK_TOKENS, dump_mooncake
    from kvflow.traces.limits import check_total
    from kvflow.traces.native import dump_native
    from kvflow.traces.synthetic import SystemPrompts, WorkloadSpec, generate_workload

    if args.num_sessions < 1:  # a trace without a request is one replay refuses
        raise CLIError(f"-n {args.num_sessions}: expected at least 1 session")
    lengths = {
        "--prompt-len": args.prompt_len,
        "--output-len": args.output_len,
        "--turns": args.turns,
    }
    traces = {flag: length_trace_path(spec) for flag, spec in lengths.items()}
    inputs = {f"the {flag} trace": path for flag, path in traces.items() if path is not None}
    check_outputs({"OUT": args.out}, {}, inputs)  # before generating anything
    arrivals: ArrivalProcess
    if args.arrival == "poisson":
        arrivals = Poisson(args.rate)
    elif args.arrival == "gamma":
        arrivals = Gamma(args.rate, args.cv)
    else:
        arrivals = AllAtOnce()
    tenants = tuple(parse_tenant(t) for t in args.tenants or ["default"])
    spec = WorkloadSpec(
        num_sessions=args.num_sessions,
        prompt_len=parse_length(args.prompt_len, "prompt"),
        output_len=parse_length(args.output_len, "output"),
        arrivals=arrivals,
        turns=parse_length(args.turns, "prompt"),
        think_time_s=args.think_time,
        system_prompts=(
            SystemPrompts(args.system_prompts, args.system_prompt_len, args.system_prompt_skew)
            if args.system_prompts
            else None
        ),
        tenants=tenants,
        seed=args.seed,
    )
    records = generate_workload(spec)  # refuses lengths replay would refuse
    out = Path(args.out)
    # What replay will need to read it back, checked before anything is written.
    if args.out_format == "mooncake":  # whole 512-token blocks
        size = MOONCAKE_BLOCK_TOKENS
        check_total(out, [-(-r.num_prompt_tokens // size) * size for r in records])
    else:
        check_total(out, [r.num_prompt_tokens for r in records])
    if args.out_format == "mooncake":
        dump_mooncake([r.to_request() for r in records], out)
    else:
        dump_native(records, out)
    last = records[-1].arrival_s if records else 0.0
    console.print(
        f"wrote {len(records)} requests ({spec.num_sessions} sessions, {last:.1f} s) "
        f"to {out} ({args.out_format})"
    )
    return 0
