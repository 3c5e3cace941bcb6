"""`kvflow replay --instances N`: a fleet of simulated instances behind a router."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from kvflow.cli.common import CLIError, config_overrides, load_requests, trace_path
from kvflow.config import ConfigError, KVFlowConfig


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    fleet = parser.add_argument_group("a fleet (virtual time only)")
    fleet.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help="simulate N instances behind a router; --set instances.K.KEY=VALUE "
        "configures instance K alone (0-based)",
    )
    fleet.add_argument(
        "--router",
        action="append",
        dest="routers",
        metavar="R",
        help="router, repeatable (default: router.name from the config, cache-aware): "
        "round-robin, least-loaded, power-of-two, cache-aware, or a plugin",
    )
    fleet.add_argument(
        "--peers",
        choices=["on", "off"],
        default="off",
        help="instances pull prefixes other instances hold over the modelled network "
        "(kv.transfer.peer_gbps, peer_latency_us) when faster than prefilling "
        "(default: off)",
    )
    fleet.add_argument(
        "--pd",
        metavar="P:D",
        help="disaggregate prefill and decode: P prefill instances (the router chooses "
        "among them) hand each prompt's KV to the least loaded of D decode instances "
        "over the modelled network; implies --instances P+D",
    )


def split_instance_overrides(
    settings: dict[str, Any], num_instances: int
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The overrides for every instance, and those for single instances
    (`instances.K.KEY`) by instance."""
    shared: dict[str, Any] = {}
    per_instance: dict[int, dict[str, Any]] = {}
    for key, value in settings.items():
        if not key.startswith("instances."):
            shared[key] = value
            continue
        _, index, rest = [*key.split(".", 2), "", ""][:3]
        if not index.isdigit() or not rest:
            raise CLIError(f"--set {key}: expected instances.K.KEY=VALUE with K a number")
        k = int(index)
        if k >= num_instances:
            raise CLIError(
                f"--set {key}: the fleet has {num_instances} instances (0..{num_instances - 1})"
            )
        per_instance.setdefault(k, {})[rest] = value
    return shared, per_instance


def fleet_configs(args: argparse.Namespace, num_instances: int) -> list[KVFlowConfig]:
    """One config per instance: the file and shared overrides, then its own."""
    shared, per_instance = split_instance_overrides(config_overrides(args), num_instances)
    base = KVFlowConfig.load(args.config, shared)
    configs = []
    for k in range(num_instances):
        own = per_instance.get(k)
        if not own:
            configs.append(base)
            continue
        try:
            configs.append(base.with_overrides(own))
        except ConfigError as err:
            raise CLIError(f"instances.{k}: {err}") from None
    return configs


def parse_pd(text: str) -> tuple[int, int]:
    """`P:D` as (P, D), each at least 1."""
    p, sep, d = text.partition(":")
    if not sep or not p.isdigit() or not d.isdigit() or int(p) < 1 or int(d) < 1:
        raise CLIError(f"--pd: expected P:D with P, D >= 1 (e.g. 1:1), got {text!r}")
    return int(p), int(d)


def run_fleet(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cli.options import (
        check_report_outputs,
        fail_if_nothing_served,
        report_console,
        report_doc,
        sim_description,
        slo_settings,
        write_json,
    )
    from kvflow.cluster import routers
    from kvflow.cluster.fleet import replay_fleet
    from kvflow.policies import make_policy
    from kvflow.traces.fleet_report import render_fleet_tables, run_name, summarize_fleet
    from kvflow.traces.outcome import nothing_served_reason

    pd = parse_pd(args.pd) if args.pd is not None else None
    n = args.instances
    if pd is not None:
        if n is None:
            n = sum(pd)
        elif n != sum(pd):
            raise CLIError(f"--pd {args.pd}: P + D = {sum(pd)}, but --instances is {n}")
    if n is None:
        raise CLIError("--router and --peers need --instances N")
    if args.engine != "sim":
        raise CLIError("--instances needs --engine sim (a fleet replays in virtual time)")
    if n < 1:
        raise CLIError(f"--instances must be >= 1, got {n!r}")
    if args.plot or args.trace_events:
        raise CLIError("--plot and --trace-events are not supported with --instances yet")
    configs = fleet_configs(args, n)
    policy_names = args.policies or ["fcfs"]
    router_names = args.routers or [configs[0].router.name]
    for name in policy_names:
        make_policy(name, configs[0])  # fail on a bad name before replaying
    for name in router_names:
        routers.create(name, configs[0])
    slo = slo_settings(args)
    path = trace_path(args)
    check_report_outputs(args, path, configs[0])
    out = report_console(args, console)
    requests = slo.apply(load_requests(args))
    if not requests:
        raise CLIError(f"{path}: no requests to replay")
    peers = args.peers == "on"
    reports = []
    unserved: dict[str, str | None] = {}
    for policy in policy_names:
        for router in router_names:
            out.print(
                f"replaying {len(requests)} requests on {n} instances ({router}, {policy}) ..."
            )
            result = replay_fleet(
                requests,
                configs,
                [make_policy(policy, c) for c in configs],
                routers.create(router, configs[0]),
                peers=peers,
                policy_name=policy,
                check_integrity=args.check_integrity,
                pd=pd,
            )
            reports.append(summarize_fleet(result))
            out.print(
                f"  {run_name(result)}: {result.wall_s:.2f} s wall, "
                f"{len(requests) / max(result.wall_s, 1e-9):,.0f} simulated requests/s"
            )
            unserved[run_name(result)] = nothing_served_reason(result.states, configs[0])
    title = (
        f"kvflow replay: {path.name}, {len(requests)} requests | {n} instances, "
        f"{sim_description(configs[0])}"
    )
    for table in render_fleet_tables(reports, out.width, title):
        out.print(table)
    if args.json:
        fleet = {
            "num_instances": n,
            "peers": peers,
            "pd": list(pd) if pd is not None else None,
            "instance_configs": {
                str(k): c.model_dump(mode="json") for k, c in enumerate(configs) if c != configs[0]
            },
        }
        doc = report_doc(
            path, "sim", configs[0], slo, runs=[r.to_json() for r in reports], fleet=fleet
        )
        write_json(doc, args.json)
    return fail_if_nothing_served(unserved)
