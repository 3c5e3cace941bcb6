"""`kvflow cluster up | status | down`: a local fleet of `kvflow serve` processes
behind one `kvflow router`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvflow.cli.common import CLIError, add_config_arguments, config_overrides
from kvflow.cli.options import add_model_arguments
from kvflow.cli.serve import _port, _positive_int


def _default_state_dir() -> Path:
    return Path(".kvflow-cluster")


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the cluster's state file and logs live (default: ./.kvflow-cluster)",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvflow.cluster.proxy_routing import names

    cp = sub.add_parser(
        "cluster",
        help="start, check and stop N kvflow serve processes behind a kvflow router",
        description="A local fleet: `up` starts N `kvflow serve` processes on free loopback "
        "ports and a `kvflow router` in front, waits until all are healthy and prints the "
        "router's URL; `status` checks each; `down` stops them (SIGTERM, then SIGKILL).",
    )
    csub = cp.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    upp = csub.add_parser("up", help="start a cluster")
    upp.add_argument(
        "--instances", type=_positive_int, required=True, metavar="N", help="instances to start"
    )
    upp.add_argument(
        "--engine", choices=["sim", "torch", "hf"], default="sim", help="each instance's runner"
    )
    add_model_arguments(upp, required=False)
    upp.add_argument("--policy", default="fcfs", metavar="P", help="scheduling policy")
    upp.add_argument(
        "--router", default="cache-aware", choices=names(), help="routing (default: cache-aware)"
    )
    upp.add_argument("--port", type=_port, default=8000, help="the router's port (default: 8000)")
    upp.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="seconds to wait for every process to be healthy (default: 180)",
    )
    _add_state_dir(upp)
    add_config_arguments(upp)
    upp.set_defaults(handler=run_up)
    st = csub.add_parser("status", help="health of each process of the cluster")
    _add_state_dir(st)
    st.set_defaults(handler=run_status)
    dn = csub.add_parser("down", help="stop the cluster (drain, then kill)")
    dn.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for draining before SIGKILL (default: 30)",
    )
    _add_state_dir(dn)
    dn.set_defaults(handler=run_down)


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir is not None else _default_state_dir()


def run_up(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.launcher import ClusterError, up
    from kvflow.config import KVFlowConfig

    if args.engine == "sim" and args.model:
        raise CLIError("--model is for --engine torch|hf; --engine sim serves no model")
    if args.engine != "sim" and not args.model:
        raise CLIError(f"--engine {args.engine} needs --model DIR")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} is not a directory")
    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    settings = config_overrides(args)
    KVFlowConfig.load(args.config, settings)  # fail on a bad setting before starting
    serve_args = ["--engine", args.engine, "--policy", args.policy]
    if args.model:
        serve_args += ["--model", os.path.abspath(args.model)]
    if args.dtype:
        serve_args += ["--dtype", args.dtype]
    if args.config:
        serve_args += ["--config", os.path.abspath(args.config)]
    for item in args.settings:
        serve_args += ["--set", item]
    try:
        state = up(
            _state_dir(args), args.instances, serve_args, args.router, args.port, args.timeout
        )
    except ClusterError as err:
        raise CLIError(str(err)) from None
    for p in state.instances:
        console.print(f"instance {p.url} (pid {p.pid}, log {p.log})")
    console.print(f"router {state.router.url} (pid {state.router.pid})")
    print(state.router.url, flush=True)
    return 0


def run_status(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.launcher import STATE_FILE, ClusterError, ClusterState, healthy, is_ours

    try:
        state = ClusterState.read(_state_dir(args) / STATE_FILE)
    except ClusterError as err:
        raise CLIError(str(err)) from None
    table = Table("role", "url", "pid", "process", "health")
    all_ok = True
    for p in state.procs:
        alive = is_ours(p.pid)
        ok = alive and healthy(p.url)
        all_ok &= ok
        table.add_row(
            p.role, p.url, str(p.pid), "running" if alive else "gone", "ok" if ok else "FAIL"
        )
    console.print(table)
    return 0 if all_ok else 1


def run_down(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.launcher import ClusterError, down

    if not args.timeout >= 0:
        raise CLIError(f"--timeout must be >= 0 seconds, got {args.timeout}")
    try:
        state, killed = down(_state_dir(args), args.timeout)
    except ClusterError as err:
        raise CLIError(str(err)) from None
    for p in killed:
        console.print(f"{p.role} {p.url} (pid {p.pid}) did not drain in time: killed")
    console.print(f"stopped {len(state.procs)} processes")
    return 0
