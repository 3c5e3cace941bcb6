"""Builders for fleet tests: workloads, the ideal single instance, fleet runs."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.cluster.fleet import FleetResult, replay_identical_fleet
from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.simulated import latency_model_from_config
from kvflow.request import Request
from kvflow.traces.distributions import Fixed, Poisson, parse_length
from kvflow.traces.fleet_report import summarize_fleet, summarize_fleet_wide
from kvflow.traces.metrics import summarize_replay
from kvflow.traces.replay import replay
from kvflow.traces.synthetic import SystemPrompts, WorkloadSpec, generate_workload


def conversations(
    num_sessions: int = 150, turns: int = 4, rate: float = 4.0, seed: int = 0
) -> list[Request]:
    """Multi-turn conversations under 4 shared system prompts (kvflow's generator)."""
    spec = WorkloadSpec(
        num_sessions=num_sessions,
        prompt_len=parse_length("lognormal:256:0.5:2048", "prompt"),
        output_len=parse_length("lognormal:64:0.5:512", "output"),
        arrivals=Poisson(rate),
        turns=Fixed(turns),
        think_time_s=5.0,
        system_prompts=SystemPrompts(4, 512, skew=0.5),
        seed=seed,
    )
    return [record.to_request() for record in generate_workload(spec)]


def one_system_prompt(num_requests: int = 400, rate: float = 200.0) -> list[Request]:
    """Single-turn requests that all open with the same 2,048-token system prompt."""
    spec = WorkloadSpec(
        num_sessions=num_requests,
        prompt_len=parse_length("lognormal:512:0.5:4096", "prompt"),
        output_len=parse_length("lognormal:64:0.5:512", "output"),
        arrivals=Poisson(rate),
        system_prompts=SystemPrompts(1, 2048),
        seed=1,
    )
    return [record.to_request() for record in generate_workload(spec)]


def ideal_config(config: KVFlowConfig, num_instances: int) -> KVFlowConfig:
    """One instance holding the fleet's cache and compute: N times the device blocks,
    the token budget and the batch slots, and each token N times cheaper."""
    lat = latency_model_from_config(config.sim)
    n = num_instances
    return config.with_overrides(
        {
            "kv.device.num_blocks": config.kv.device.num_blocks * n,
            "scheduler.max_num_batched_tokens": config.scheduler.max_num_batched_tokens * n,
            "scheduler.max_num_seqs": config.scheduler.max_num_seqs * n,
            "sim.prefill_token_us": lat.prefill_token_us / n,
            "sim.decode_seq_us": lat.decode_seq_us / n,
            "sim.kv_token_ns": lat.kv_token_ns / n,
        }
    )


def ideal_hit_rate(requests: Sequence[Request], config: KVFlowConfig, n: int) -> float:
    return summarize_replay(replay(requests, ideal_config(config, n), "fcfs")).prefix_hit_rate


def run_fleet(
    requests: Sequence[Request],
    config: KVFlowConfig,
    n: int,
    router: str,
    *,
    peers: bool = False,
    check_integrity: bool = False,
) -> FleetResult:
    return replay_identical_fleet(
        requests, config, n, "fcfs", router, peers=peers, check_integrity=check_integrity
    )


def assert_fleet_wide_is_the_full_report_less_its_fleet_figures(result: FleetResult) -> None:
    """The planner's fleet-wide report is the full report's, without the `fleet` key."""
    full = summarize_fleet(result).report.to_json(wall_clock=False)
    del full["fleet"]
    assert summarize_fleet_wide(result).to_json(wall_clock=False) == full
