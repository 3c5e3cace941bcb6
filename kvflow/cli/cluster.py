"""`kvflow cluster up | status | down`: a local fleet of `kvflow serve` processes
behind one `kvflow router`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kvflow.cli.common import CLIError, add_config_arguments, single_instance_overrides
from kvflow.cli.options import add_model_arguments, check_engine_model, port_number, positive_int

if TYPE_CHECKING:
    from kvflow.cluster.launcher import RaySpec
    from kvflow.config import KVFlowConfig


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
        "--instances",
        type=positive_int,
        metavar="N",
        help="instances to start (required unless --pd gives them)",
    )
    upp.add_argument(
        "--pd",
        metavar="P:D",
        help="prefill/decode disaggregation: P `--role prefill` and D `--role decode` "
        "instances (--engine torch|hf; decode needs kv.cpu.num_blocks); the router prefills "
        "each request on a prefill instance and hands its KV to a decode instance; implies "
        "--instances P+D",
    )
    upp.add_argument(
        "--engine", choices=["sim", "torch", "hf"], default="sim", help="each instance's runner"
    )
    add_model_arguments(upp, required=False)
    upp.add_argument("--policy", default="fcfs", metavar="P", help="scheduling policy")
    upp.add_argument(
        "--router",
        default=None,
        metavar="R",
        help="routing: round-robin, least-loaded, power-of-two, cache-aware or a plugin "
        "(default: router.name from the config, cache-aware)",
    )
    upp.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="the router's port (default: 8000; 0: a free port, printed)",
    )
    upp.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="seconds to wait for every process to be healthy (default: 180)",
    )
    ray = upp.add_argument_group(
        "Ray", "instances as Ray actors (pip install 'kvflow[ray]'; docs/fleet.md)"
    )
    ray.add_argument(
        "--ray",
        action="store_true",
        help="each instance is a Ray actor running `kvflow serve` on the node Ray places it "
        "on (a local Ray cluster is started for the run unless --ray-address)",
    )
    ray.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="a running Ray cluster to place the instances on (implies --ray)",
    )
    ray.add_argument(
        "--ray-cpus-per-instance",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs each instance's actor reserves (default: 1)",
    )
    ray.add_argument(
        "--ray-gpus-per-instance",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each instance's actor reserves (default: 0)",
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
    path = Path(args.state_dir) if args.state_dir is not None else _default_state_dir()
    if path.exists() and not path.is_dir():
        raise CLIError(f"--state-dir {str(path)!r} is not a directory")
    return path


def _roles(args: argparse.Namespace) -> tuple[str, ...]:
    from kvflow.cli.fleet import parse_pd

    if args.pd is None:
        if args.instances is None:
            raise CLIError("kvflow cluster up needs --instances N (or --pd P:D)")
        num_instances: int = args.instances
        return ("instance",) * num_instances
    num_prefill, num_decode = parse_pd(args.pd)
    if args.instances is not None and args.instances != num_prefill + num_decode:
        raise CLIError(
            f"--pd {args.pd}: P + D = {num_prefill + num_decode}, but --instances is "
            f"{args.instances}"
        )
    if args.engine == "sim":
        raise CLIError("--pd needs --engine torch or hf (sim holds no KV bytes to hand off)")
    return ("prefill",) * num_prefill + ("decode",) * num_decode


def _ray_spec(args: argparse.Namespace) -> RaySpec | None:
    from kvflow.cluster.launcher import RaySpec

    resources = {
        "--ray-cpus-per-instance": (args.ray_cpus_per_instance, 1.0),
        "--ray-gpus-per-instance": (args.ray_gpus_per_instance, 0.0),
    }
    for name, (value, _) in resources.items():
        if not value >= 0:
            raise CLIError(f"{name} must be >= 0, got {value}")
    if not args.ray and args.ray_address is None:
        given = [name for name, (value, default) in resources.items() if value != default]
        if given:
            raise CLIError(f"{given[0]} needs --ray")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise CLIError("--ray needs ray: pip install 'kvflow[ray]'")
    return RaySpec(args.ray_address, args.ray_cpus_per_instance, args.ray_gpus_per_instance)


SERVE_PROCESS_BYTES = 64 * 2**20
"""The least RAM one `kvflow serve` process takes before its store (an idle `--engine
sim` server measured ~70 MB resident)."""


def _check_room(num_instances: int, config: KVFlowConfig) -> None:
    """Refuse, before starting any, more instances than the RAM holds at their least:
    each a `kvflow serve` process and its store's block bookkeeping."""
    from kvflow.kv.block_pool import BlockPool
    from kvflow.kv.capacity import available_ram_bytes, check_fits

    kv = config.kv
    blocks = sum(kv.tier_blocks(t) for t in ("device", "cpu", "disk"))
    each = SERVE_PROCESS_BYTES + BlockPool.bytes_needed(blocks)
    what = f"--instances {num_instances} ({num_instances} kvflow serve processes)"
    check_fits(
        [(what, num_instances * each)],
        f"RAM at least (~{SERVE_PROCESS_BYTES // 2**20} MiB each and their stores' block "
        "bookkeeping)",
        available_ram_bytes(),
        "RAM available",
    )


def run_up(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.launcher import ClusterError, ClusterSpec, free_port, up
    from kvflow.config import KVFlowConfig

    check_engine_model(args)
    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    roles = _roles(args)
    ray = _ray_spec(args)
    settings = single_instance_overrides(args)
    config = KVFlowConfig.load(args.config, settings)  # fail on a bad setting before starting
    if "decode" in roles and config.kv.tier_blocks("cpu") == 0:
        raise CLIError(
            "--pd: decode instances pull handed-off KV into the cpu tier: set "
            "kv.cpu.num_blocks (e.g. --set kv.cpu.num_blocks=4096)"
        )
    if args.ray_address is None:  # else Ray places them on its cluster's nodes
        _check_room(len(roles), config)
    from kvflow.cluster.routers import create

    create(args.router or config.router.name, config)  # and on an unknown router
    # The router reads the same config: block size, latency model, peer secret.
    config_args: list[str] = []
    if args.config:
        config_args += ["--config", os.path.abspath(args.config)]
    for item in args.settings:
        config_args += ["--set", item]
    serve_args = ["--engine", args.engine, "--policy", args.policy, *config_args]
    router_args = [*config_args]
    if args.router:
        router_args += ["--router", args.router]
    if args.model:
        serve_args += ["--model", os.path.abspath(args.model)]
        router_args += ["--model", os.path.abspath(args.model)]
    if args.dtype:
        serve_args += ["--dtype", args.dtype]
    spec = ClusterSpec(
        roles,
        tuple(serve_args),
        tuple(router_args),
        args.port or free_port(),  # the router's URL is waited on and recorded
        ray,
        pull_from_peers=args.engine != "sim",
    )
    try:
        state = up(_state_dir(args), spec, args.timeout)
    except ClusterError as err:
        raise CLIError(str(err)) from None
    for p in state.instances:
        where = f"pid {p.pid}" + (f" on Ray node {p.node}" if p.node else "")
        console.print(f"{p.role} {p.url} ({where}, log {p.log})")
    if state.ray_driver is not None:
        console.print(f"ray driver (pid {state.ray_driver.pid}, log {state.ray_driver.log})")
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
        if p.node:  # a Ray actor's process: its node is not necessarily this machine
            process = f"ray actor ({p.node})"
            ok = healthy(p.url)
        else:
            alive = is_ours(p.process_id)
            process = "running" if alive else "gone"
            # The Ray driver serves nothing: running is its health.
            ok = alive and (p.role == "ray" or healthy(p.url))
        all_ok &= ok
        table.add_row(p.role, p.url or "-", str(p.pid), process, "ok" if ok else "FAIL")
    console.print(table)
    return 0 if all_ok else 1


def run_down(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.launcher import ClusterError, down

    if not args.timeout >= 0:
        raise CLIError(f"--timeout must be >= 0 seconds, got {args.timeout}")
    try:
        state, killed, gone = down(_state_dir(args), args.timeout)
    except ClusterError as err:
        raise CLIError(str(err)) from None
    for p in killed:
        console.print(f"{p.role} {p.url} (pid {p.pid}) did not drain in time: killed")
    line = f"stopped {len(state.procs) - len(gone)} processes"
    if gone:
        line += f"; {len(gone)} had exited already: "
        line += ", ".join(f"{p.role} pid {p.pid}" for p in gone)
    console.print(line)
    return 0
