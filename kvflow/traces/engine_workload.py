"""The engine's own time per step, measured on a real-time run of a calibration
workload: the workload (`calibration_workload`), its arrivals (`overloaded_arrivals`),
and the run and fit (`measure_engine`), for `kvflow calibrate`."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvflow.engine_adapters.base import ModelRunner
from kvflow.traces.validate import timed_realtime

if TYPE_CHECKING:
    from kvflow.config import KVFlowConfig
    from kvflow.engine_adapters.engine_timing import EngineStep, Overhead
    from kvflow.engine_adapters.latency_fit import Sample
    from kvflow.engine_adapters.simulated import LatencyModel
    from kvflow.kv.store import KVStore
    from kvflow.request import Request


def calibration_workload(
    num_requests: int, vocab_size: int, max_len: int, seed: int = 7
) -> list[Request]:
    """Requests for timing the engine: two shared system prompts, varied own prompts
    (up to 640 tokens) and outputs (8 to 128 tokens), all at t=0 (`measure_engine`
    spreads them). Folded into the vocabulary; every request fits in `max_len`
    positions.

    The lengths are chosen so that, arriving faster than the engine serves them, the
    requests build the steps a loaded server runs: decode batches of 30 to 60
    sequences over contexts of several hundred tokens, beside prefill chunks of
    hundreds of tokens (with the default 64 requests and a 512-token step budget).
    Shorter outputs (the earlier 4 to 48) never let a decode batch grow past ~20, so
    the live refit never saw the busiest steps, which a queue turns into the last
    arrivals' wait.
    """
    from kvflow.traces.realtime import fit_to_vocab
    from kvflow.traces.synthetic import shared_prefix_workload

    prefix = max(1, min(128, max_len // 4))
    records = shared_prefix_workload(
        num_requests,
        num_groups=2,
        prefix_len=prefix,
        suffix_len=(4, max(4, min(640, max_len // 2 - prefix))),
        output_len=(min(8, max(1, max_len // 4)), max(4, min(128, max_len // 4))),
        seed=seed,
    )
    return fit_to_vocab([r.to_request() for r in records], vocab_size)


def overloaded_arrivals(
    requests: Sequence[Request], config: KVFlowConfig, runner_model: LatencyModel, load: float
) -> list[Request]:
    """`requests` arriving as a Poisson stream (seeded) at `load` times the rate at which
    `runner_model` says the engine serves them (all of them at once, replayed in virtual
    time under `config`): above 1, queues form, and steps mix prefills and decodes."""
    from kvflow.engine_adapters.simulated import SimulatedRunner
    from kvflow.traces.replay import replay

    burst = [dataclasses.replace(r, arrival_time=0.0) for r in requests]
    makespan = replay(burst, config, "fcfs", SimulatedRunner(runner_model)).end_time
    rate = load * len(burst) / makespan if makespan > 0 else 1e3
    rng = random.Random(0)
    t = 0.0
    timed = []
    for r in burst:
        timed.append(dataclasses.replace(r, arrival_time=t))
        t += rng.expovariate(rate)
    return timed


def measure_engine(
    runner: ModelRunner,
    config: KVFlowConfig,
    store: KVStore,
    runner_model: LatencyModel,
    requests: Sequence[Request],
    load: float = 2.0,
    *,
    rescale: bool = False,
    grid: Sequence[Sample] = (),
    probe: Callable[[], float] | None = None,
) -> tuple[Overhead, float, list[EngineStep], float]:
    """Replay `requests` in real time through `AsyncEngine` over `runner`, arriving as
    a Poisson stream at `load` times the rate the runner model says the engine can
    serve (`overloaded_arrivals`: queues form and steps mix prefills and decodes), and
    fit the engine's overhead on the busy steps (`fit_overhead`, with `rescale`).
    With `probe` (the machine's speed now against the grid's timing), called just before
    and just after the run, the mean of the two is returned beside the fit, which it does
    not change: a probe samples the machine for a moment, and dividing the run's steps by
    one made a preset 34% too slow where the run's own steps had run at the grid's
    speed. Returns the fit, `engine_noise` of the run, the busy steps and the probed
    speed (1.0 without a probe).

    Raises:
        ValueError: no busy step was seen (too few requests).
    """
    from kvflow.engine_adapters.engine_timing import (
        busy_steps,
        engine_noise,
        fit_overhead,
    )

    timed = overloaded_arrivals(requests, config, runner_model, load)
    before = probe() if probe else 1.0
    _, timed_steps = timed_realtime(timed, config, "fcfs", runner, store)
    speed = (before + probe()) / 2 if probe else 1.0
    steps = busy_steps(timed_steps)
    overhead = fit_overhead(runner_model, steps, rescale=rescale, grid=grid)
    return overhead, engine_noise(steps), steps, speed


__all__ = ["calibration_workload", "measure_engine", "overloaded_arrivals"]
