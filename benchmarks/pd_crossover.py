"""Prefill/decode disaggregation against colocation: SLO attainment over network
bandwidth and prompt length, in virtual time.

For each prompt length and `kv.transfer.peer_gbps`, replays the same workload through
two colocated instances (cache-aware router) and through 1 prefill + 1 decode instance
(`replay_fleet(..., pd=(1, 1))`), and prints one JSON line: the share of requests that
met both SLOs each way, and the handoff bytes. The workload: `--requests` single-turn
requests of fixed prompt length (no shared prefixes) and `--output-len` outputs,
arriving as a Poisson process at `--rate` per second, all with the SLOs TTFT
`--ttft-ms` and TPOT `--tpot-ms`, on the default latency model (llama3-8b-h100).

    python benchmarks/pd_crossover.py [--prompt-lens 256,1024,2048,4096]
        [--gbps 0.1,1,12,50] [--rate 10] [--requests 100] [--output-len 16]
        [--ttft-ms 1000] [--tpot-ms 8]
"""

from __future__ import annotations

import argparse
import json

from kvflow.cluster.fleet import FleetResult, replay_identical_fleet
from kvflow.config import KVFlowConfig
from kvflow.request import SLO, Request
from kvflow.traces.distributions import Fixed, Poisson
from kvflow.traces.outcome import request_outcome
from kvflow.traces.synthetic import TenantSpec, WorkloadSpec, generate_workload


def workload(args: argparse.Namespace, prompt_len: int) -> list[Request]:
    spec = WorkloadSpec(
        num_sessions=args.requests,
        prompt_len=Fixed(prompt_len),
        output_len=Fixed(args.output_len),
        arrivals=Poisson(args.rate),
        tenants=(TenantSpec("default", slo=SLO(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)),),
        seed=0,
    )
    return [record.to_request() for record in generate_workload(spec)]


def run(requests: list[Request], gbps: float, pd: tuple[int, int] | None) -> FleetResult:
    config = KVFlowConfig().with_overrides(
        {"kv.transfer.peer_gbps": gbps, "kv.device.num_blocks": 4000}
    )
    return replay_identical_fleet(requests, config, 2, "fcfs", "cache-aware", pd=pd)


def attainment(result: FleetResult) -> float:
    states = result.states
    return sum(request_outcome(s).met for s in states) / len(states) if states else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lens", default="256,1024,2048,4096")
    parser.add_argument("--gbps", default="0.1,1,12,50")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-ms", type=float, default=8.0)
    args = parser.parse_args()
    for prompt_len in (int(x) for x in args.prompt_lens.split(",")):
        requests = workload(args, prompt_len)
        for gbps in (float(x) for x in args.gbps.split(",")):
            colocated = run(requests, gbps, None)
            disaggregated = run(requests, gbps, (1, 1))
            print(
                json.dumps(
                    {
                        "prompt_len": prompt_len,
                        "peer_gbps": gbps,
                        "colocated": round(attainment(colocated), 3),
                        "disaggregated": round(attainment(disaggregated), 3),
                        "pd_handoff_bytes": disaggregated.pd_handoff_bytes,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
