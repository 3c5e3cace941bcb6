"""Replay speed: simulated requests per wall-clock second, replaying a 10,000-request
Mooncake-style trace under LPM in virtual time.

The trace is made by kvflow itself, shaped like Mooncake's conversation traces:
2,500 conversations of 4 turns starting as a Poisson process (6 per second), each
opening with one of 32 shared system prompts of 2,048 tokens (Zipf 0.5 popularity);
user turns of lognormal length (median 384 tokens, sigma 0.8), outputs as short as
Mooncake's (lognormal, median 20 tokens, sigma 1), 10 s think time. The mean prompt is
about 3,500 tokens (Mooncake's own traces average 8k-21k). The trace is written in
Mooncake format (512-token hash ids) to a temporary file and read back with the
Mooncake reader. Load time (reading the file, building token ids) is reported
separately; requests_per_s counts only `kvflow.traces.replay.replay(requests, config,
"lpm")` (the fastest of --repeat runs). Prints one JSON line.

    python benchmarks/replay_speed.py [--policy lpm] [--repeat 3] [--profile]
        [--prompt-len LEN] [--output-len LEN] [--system-prompt-len N] [--rate R]
        [--instances N] [--router cache-aware]

With `--instances N`, a fleet of N instances (`replay_identical_fleet`, each with the
single instance's config) behind `--router` replays N times the sessions arriving N
times as fast (the same 448 s of virtual time), so each instance carries the
single-instance workload. The single-instance replay is then measured in the same run,
alternating with the fleet's (`single_requests_per_s`), and `ratio` is the fleet's
figure over it: the machine's speed and load cancel out of it.

Each run also counts its CPU time (`time.process_time`): `cpu_requests_per_s` and, for a
fleet, `single_cpu_requests_per_s` and `cpu_ratio` (fastest against fastest, as the wall
figures). On a shared machine CPU time leaves out the time other processes held the
cores, which wall time does not (the cache they share still counts in both).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvflow.cluster.fleet import replay_identical_fleet
from kvflow.config import KVFlowConfig
from kvflow.request import Request
from kvflow.traces.distributions import Fixed, LengthDist, Poisson, parse_length
from kvflow.traces.formats import read_trace
from kvflow.traces.formats.mooncake import dump_mooncake
from kvflow.traces.replay import replay
from kvflow.traces.synthetic import SystemPrompts, WorkloadSpec, generate_workload

NUM_SESSIONS = 2500
TURNS = 4
CONFIG: dict[str, Any] = {
    "scheduler": {"max_num_batched_tokens": 8192, "max_num_seqs": 256},
    "kv": {"block_size": 16, "device": {"num_blocks": 32768}},
}


def mooncake_style_trace(
    path: Path,
    prompt_len: LengthDist,
    output_len: LengthDist,
    system_prompt_len: int,
    session_rate: float,
    num_sessions: int = NUM_SESSIONS,
) -> None:
    """Write the benchmark's trace to `path` in Mooncake format."""
    spec = WorkloadSpec(
        num_sessions=num_sessions,
        prompt_len=prompt_len,
        output_len=output_len,
        arrivals=Poisson(session_rate),
        turns=Fixed(TURNS),
        think_time_s=10.0,
        system_prompts=SystemPrompts(32, system_prompt_len, skew=0.5),
        seed=0,
    )
    dump_mooncake([record.to_request() for record in generate_workload(spec)], path)


def run_fleet_once(
    requests: list[Request], config: KVFlowConfig, policy: str, instances: int, router: str
) -> dict[str, Any]:
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = replay_identical_fleet(requests, config, instances, policy, router)
    wall_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    hits = sum(i.stats.prefix_hit_tokens for i in result.instances)
    queried = sum(i.stats.prefix_query_tokens for i in result.instances)
    return {
        "replay_wall_s": round(wall_s, 3),
        "requests_per_s": round(len(requests) / wall_s, 1),
        "replay_cpu_s": round(cpu_s, 3),
        "cpu_requests_per_s": round(len(requests) / cpu_s, 1),
        "sim_steps": sum(i.stats.num_steps for i in result.instances),
        "prefix_hit_rate": round(hits / queried if queried else 0.0, 4),
        "num_preemptions": sum(i.stats.num_preemptions for i in result.instances),
        "sim_duration_s": round(result.end_time - requests[0].arrival_time, 1),
        "num_leaked_blocks": sum(i.num_leaked_blocks for i in result.instances),
        "load_imbalance": round(result.load_imbalance, 3),
    }


def run_once(requests: list[Request], config: KVFlowConfig, policy: str) -> dict[str, Any]:
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = replay(requests, config, policy)
    wall_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    return {
        "replay_wall_s": round(wall_s, 3),
        "requests_per_s": round(len(requests) / wall_s, 1),
        "replay_cpu_s": round(cpu_s, 3),
        "cpu_requests_per_s": round(len(requests) / cpu_s, 1),
        "sim_steps": result.stats.num_steps,
        "prefix_hit_rate": round(result.stats.prefix_hit_rate, 4),
        "num_preemptions": result.stats.num_preemptions,
        "sim_duration_s": round(result.end_time - requests[0].arrival_time, 1),
        "num_leaked_blocks": result.num_leaked_blocks,
    }


def load_trace(args: argparse.Namespace, scale: int) -> tuple[list[Request], float]:
    """The benchmark's trace with `scale` times the sessions arriving `scale` times as
    fast, written and read back; and the seconds reading it took."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mooncake_style.jsonl"
        mooncake_style_trace(
            path,
            parse_length(args.prompt_len, "prompt"),
            parse_length(args.output_len, "output"),
            args.system_prompt_len,
            args.rate * scale,
            NUM_SESSIONS * scale,
        )
        gc.collect()
        start = time.perf_counter()
        requests = read_trace(path, "mooncake").requests
        return requests, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="lpm")
    parser.add_argument("--repeat", type=int, default=3, help="report the fastest replay")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one replay")
    parser.add_argument("--prompt-len", default="lognormal:384:0.8:8192", metavar="LEN")
    parser.add_argument("--output-len", default="lognormal:20:1:1024", metavar="LEN")
    parser.add_argument("--system-prompt-len", type=int, default=2048, metavar="N")
    parser.add_argument("--rate", type=float, default=6.0, help="conversations per second")
    parser.add_argument(
        "--block-size", type=int, default=16, help="kv.block_size (device tier keeps 512k tokens)"
    )
    parser.add_argument("--instances", type=int, default=1, help="fleet size (default 1)")
    parser.add_argument("--router", default="cache-aware", help="the fleet's router")
    args = parser.parse_args()
    config = KVFlowConfig.from_dict(
        CONFIG,
        {"kv.block_size": args.block_size, "kv.device.num_blocks": 2**19 // args.block_size},
    )
    requests, load_s = load_trace(args, args.instances)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(replay, requests, config, args.policy)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    baseline: dict[str, Any] = {}
    if args.instances > 1:
        single, _ = load_trace(args, 1)
        runs, singles = [], []
        for _ in range(args.repeat):
            singles.append(run_once(single, config, args.policy))
            runs.append(run_fleet_once(requests, config, args.policy, args.instances, args.router))
        fastest_single = max(float(r["requests_per_s"]) for r in singles)
        fastest_fleet = max(float(r["requests_per_s"]) for r in runs)
        fastest_single_cpu = max(float(r["cpu_requests_per_s"]) for r in singles)
        fastest_fleet_cpu = max(float(r["cpu_requests_per_s"]) for r in runs)
        baseline = {
            "single_requests_per_s": fastest_single,
            "ratio": round(fastest_fleet / fastest_single, 3),
            "single_cpu_requests_per_s": fastest_single_cpu,
            "cpu_ratio": round(fastest_fleet_cpu / fastest_single_cpu, 3),
        }
    else:
        runs = [run_once(requests, config, args.policy) for _ in range(args.repeat)]
    best = max(runs, key=lambda r: float(r["requests_per_s"]))
    num_tokens = [len(r.prompt_token_ids) for r in requests]
    num_outputs = [r.max_new_tokens for r in requests]
    print(
        json.dumps(
            {
                "benchmark": "replay_speed",
                "policy": args.policy,
                **(
                    {"instances": args.instances, "router": args.router}
                    if args.instances > 1
                    else {}
                ),
                "block_size": args.block_size,
                "num_requests": len(requests),
                "mean_prompt_tokens": round(statistics.fmean(num_tokens), 1),
                "mean_output_tokens": round(statistics.fmean(num_outputs), 1),
                "load_s": round(load_s, 3),
                "load_requests_per_s": round(len(requests) / load_s, 1),
                **best,
                **baseline,
            }
        )
    )


if __name__ == "__main__":
    main()
