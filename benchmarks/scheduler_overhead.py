"""Per-step CPU cost of Scheduler.plan + Scheduler.commit on workload W.

W: 2048 requests of 1024-token prompts whose first 512 tokens are one of 16 shared
prefixes, 128 output tokens each, all arriving at t=0; budget 8192 tokens, 256 seqs,
block size 16, simulated runner (its time is not counted). Prints one JSON line.

    python benchmarks/scheduler_overhead.py [--policy fcfs] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.simulated import SimulatedRunner
from kvflow.request import Request
from kvflow.scheduler import Scheduler
from kvflow.traces.replay import make_policy


def workload_w(seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(512)] for _ in range(16)]
    return [
        Request(
            request_id=f"w{i}",
            prompt_token_ids=prefixes[i % 16] + [rng.randrange(32000) for _ in range(512)],
            max_new_tokens=128,
        )
        for i in range(2048)
    ]


def run_once(policy: str) -> dict[str, float]:
    config = KVFlowConfig.from_dict(
        {
            "scheduler": {"max_num_batched_tokens": 8192, "max_num_seqs": 256},
            "kv": {"block_size": 16, "device": {"num_blocks": 65536}},
        }
    )
    scheduler = Scheduler(config, make_policy(policy, config))
    runner = SimulatedRunner.from_config(config.sim)
    for req in workload_w():
        scheduler.add(req)
    step_ns: list[int] = []
    now = 0.0
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # the collector's pauses are not the scheduler's cost
    try:
        while scheduler.has_unfinished:
            t0 = clock()
            plan = scheduler.plan(now)
            t1 = clock()
            result = runner.execute(plan)
            now += result.duration_s
            t2 = clock()
            scheduler.commit(plan, result, now)
            t3 = clock()
            step_ns.append((t1 - t0) + (t3 - t2))
    finally:
        gc.enable()
    step_ns.sort()
    return {
        "plan_commit_p50_ms": step_ns[len(step_ns) // 2] / 1e6,
        "plan_commit_p99_ms": step_ns[min(len(step_ns) - 1, int(len(step_ns) * 0.99))] / 1e6,
        "plan_commit_mean_ms": statistics.fmean(step_ns) / 1e6,
        "steps": len(step_ns),
        "prefix_hit_rate": round(scheduler.stats.prefix_hit_rate, 4),
        "leaked_blocks": scheduler.num_leaked_blocks(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--repeat", type=int, default=3, help="report the run with the best p50")
    args = parser.parse_args()
    runs = [run_once(args.policy) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["plan_commit_p50_ms"])
    print(json.dumps({"benchmark": "scheduler_overhead", "policy": args.policy, **best}))


if __name__ == "__main__":
    main()
