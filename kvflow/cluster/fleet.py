"""Fleet replay: N simulated instances and a router in one discrete-event loop.

Each instance steps on its own clock (the event loop is `kvflow.cluster.loop`); nothing
sleeps, and the same inputs give the same results, bit for bit.

With peers on, a request routed to an instance that lacks a prefix another instance
holds (as the router's index says) first pulls those blocks over the modelled network,
when that is faster than prefilling them: the owner re-validates what it holds, the
blocks land in the instance's cpu tier (device when it has none) after `latency +
bytes / bandwidth`, and only then is the request added, to find them there as any
cached prefix. The scheduler and store are the single-instance ones, unchanged.

With prefill/decode disaggregation (`pd=(P, D)`), instances 0..P-1 prefill and
P..P+D-1 decode. The router chooses among the prefill instances (it routes over a view
of those alone); each request with more than one token to generate is prefilled there
as a copy asking for one token (its first token, so TTFT ends there), then its prompt's
full blocks are handed off over the same network model to the least loaded decode
instance, land in its landing tier as pulled blocks do, and the request continues
there as a new request whose prompt is the original prompt plus the first token (a
prefix hit for every full block). The fleet report merges the two halves back into one
request per id with continuous token times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvflow.cluster import routers
from kvflow.cluster.loop import FleetLoop
from kvflow.cluster.results import FleetResult, FleetStalledError, InstanceResult, Pull
from kvflow.cluster.routers import Router
from kvflow.config import KVFlowConfig
from kvflow.gc_pause import cyclic_gc_paused
from kvflow.policies import make_policy
from kvflow.policies.base import Policy
from kvflow.request import Request

__all__ = [
    "FleetResult",
    "FleetStalledError",
    "InstanceResult",
    "Pull",
    "replay_fleet",
    "replay_identical_fleet",
]


def replay_fleet(
    requests: Sequence[Request],
    configs: Sequence[KVFlowConfig],
    policies: Sequence[Policy],
    router: Router,
    *,
    peers: bool = False,
    policy_name: str = "",
    check_integrity: bool = False,
    pd: tuple[int, int] | None = None,
) -> FleetResult:
    """Replay `requests` through a fleet in virtual time.

    Args:
        requests: in any order; arrival times on the replay clock (seconds).
        configs: one configuration per instance.
        policies: one policy object per instance (not shared: policies keep state).
        router: decides the instance of each request at its arrival.
        peers: pull prefixes other instances hold over the modelled network (needs
            equal `kv.block_size` and `kv.layout` everywhere).
        policy_name: the policies' name, for the report.
        check_integrity: check every instance's invariants after every commit (slow).
        pd: (P, D): disaggregate prefill (instances 0..P-1) and decode (the D after);
            P + D must be the number of instances.

    Raises:
        ValueError: no instance, or configs and policies of different lengths, or peers
            or handoffs between instances whose blocks differ, or a bad `pd`.
        FleetStalledError: an instance holds requests it can never schedule.
    """
    loop = FleetLoop(configs, policies, router, peers, check_integrity, pd)
    wall_start = time.perf_counter()
    with cyclic_gc_paused():
        end = loop.run(sorted(requests, key=lambda r: r.arrival_time))
    results = [loop.finish(inst) for inst in loop.instances]
    merged = loop.merged_states(results) if pd is not None else None
    return FleetResult(
        policy=policy_name or type(policies[0]).__name__,
        router=router.name or type(router).__name__,
        peers=peers,
        instances=results,
        pulls=loop.pulls,
        routed=loop.routed,
        load_imbalance=_ratio(loop.sum_max_load, loop.sum_mean_load),
        request_imbalance=_ratio(loop.sum_max_held, loop.sum_mean_held),
        end_time=end,
        wall_s=time.perf_counter() - wall_start,
        pd=pd,
        handoffs=loop.handoffs,
        merged_states=merged,
    )


def replay_identical_fleet(
    requests: Sequence[Request],
    config: KVFlowConfig,
    num_instances: int,
    policy: str,
    router: str,
    *,
    peers: bool = False,
    check_integrity: bool = False,
    pd: tuple[int, int] | None = None,
) -> FleetResult:
    """`replay_fleet` on `num_instances` instances all configured by `config`, each
    with its own policy `policy`, behind the router `router` (both by registered name,
    their options from `config`); `pd` splits them as `replay_fleet`'s does.

    Raises:
        UnknownNameError: an unknown policy or router.
        ValueError, FleetStalledError: as `replay_fleet`.
    """
    return replay_fleet(
        requests,
        [config] * num_instances,
        [make_policy(policy, config) for _ in range(num_instances)],
        routers.create(router, config),
        peers=peers,
        policy_name=policy,
        check_integrity=check_integrity,
        pd=pd,
    )


def _ratio(total_max: float, total_mean: float) -> float:
    return total_max / total_mean if total_mean else 1.0
