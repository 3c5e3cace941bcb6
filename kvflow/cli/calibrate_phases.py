"""`kvflow calibrate`'s phases after the grid: the engine's timing (its overhead and the
live refit), the tiers' copies, and the drift's summary for the fit record."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console


def time_engine(
    args: argparse.Namespace,
    console: Console,
    model: Any,
    fitted: Any,
    settings: dict[str, Any],
    grid: list[Any],
    probe: Any,
) -> tuple[Any, dict[str, Any], list[Any]]:
    """The runner model (refitted on the engine's busy steps with the training `grid`
    beside them, unless `--no-rescale`) plus the engine's overhead, the figures of that
    fit, and the engine's busy steps."""
    import dataclasses

    from kvflow.engine_adapters.calibrate import Sample, residuals_by_shape
    from kvflow.engine_adapters.factory import build_runner
    from kvflow.traces.engine_workload import calibration_workload, measure_engine

    config, runner, store = build_runner(model, settings)
    requests = calibration_workload(
        args.engine_requests, model.vocab_size, min(2048, config.scheduler.max_model_len)
    )
    console.print(f"timing the engine's steps over {len(requests)} requests in real time ...")
    try:
        overhead, noise, steps, speed = measure_engine(
            runner, config, store, fitted, requests, rescale=args.rescale, grid=grid, probe=probe
        )
    finally:
        store.close()
    with_engine = dataclasses.replace(
        overhead.runner,
        step_overhead_ms=overhead.step_overhead_ms,
        seq_overhead_us=overhead.seq_overhead_us,
    )
    figures = {
        "num_steps": overhead.num_steps,
        "median_rel_error": overhead.median_rel_error,
        "runner_median_rel_error": overhead.runner_median_rel_error,
        "runner_scale": overhead.runner_scale,
        "rescaled": args.rescale,
        "refitted": args.rescale and bool(grid),
        "live_median_rel_error": overhead.live_median_rel_error,
        "noise_median_rel_dev": noise,
        "machine_speed_probed": speed if probe else None,
        "bias_by_shape": residuals_by_shape(
            with_engine, [Sample(s.features, s.period_s) for s in steps]
        ),
    }
    return with_engine, figures, steps


def time_tiers(args: argparse.Namespace, console: Console, model: Any) -> dict[str, float]:
    from kvflow.config import KVFlowConfig
    from kvflow.kv.bandwidth import measure_transfer, transfer_settings

    kv = KVFlowConfig.load(None, {**model.layout, "kv.block_size": args.block_size}).kv
    console.print("timing the store's tier copies (device<->cpu, cpu->disk, disk->device) ...")
    fits = measure_transfer(kv, model.device, sizes_mib=args.tier_mib, directory=args.tier_dir)
    return transfer_settings(fits)


def drift_figures(drift: list[float], neighbours: int) -> dict[str, Any]:
    """The machine's speed factors over the grid's timing (time / typical), summarised
    (`measure` times every training mix at least once: never fewer than 2 factors)."""
    import statistics

    deciles = statistics.quantiles(drift, n=10, method="inclusive")
    return {
        "neighbours": neighbours,
        "p10": deciles[0],
        "p90": deciles[-1],
        "min": min(drift),
        "max": max(drift),
    }
