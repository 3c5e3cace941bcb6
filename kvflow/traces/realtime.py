"""Real-time replay: a trace's arrivals in wall-clock time through the async engine.

Each request is submitted at its arrival offset (times `time_scale`) after the replay
starts, and its stream is drained by a task of its own. The engine stamps arrival at
submission on its clock, which here counts seconds from the start of the replay, so
TTFT and the other latencies include any lateness of the submitting loop as a real
client's would. Requests ignore the model's end-of-sequence tokens (`ignore_eos`), so
outputs keep the trace's lengths as in the simulator. The result has the simulator's
shape (`ReplayResult`), so `summarize_replay`, the tables and the JSON report work
unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskGroup

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.factory import run_blocking
from kvflow.kv.store import KVStore
from kvflow.policies.base import Policy
from kvflow.request import Request, RequestState
from kvflow.traces.replay import ReplayResult, resolve_policy


def fit_to_vocab(requests: Sequence[Request], vocab_size: int) -> list[Request]:
    """Requests whose prompt token ids are folded into `[0, vocab_size)` (id modulo
    vocab size), so a trace's synthesised ids run on any model. Equal ids stay equal,
    so shared prefixes stay shared."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
    folded = []
    for r in requests:
        if any(t >= vocab_size for t in r.prompt_token_ids):
            r = dataclasses.replace(
                r, prompt_token_ids=tuple(t % vocab_size for t in r.prompt_token_ids)
            )
        folded.append(r)
    return folded


def replay_realtime(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: Policy | str,
    runner: ModelRunner,
    store: KVStore | None = None,
    time_scale: float = 1.0,
    clock: Callable[[], float] | None = None,
) -> ReplayResult:
    """Replay `requests` in wall-clock time through an `AsyncEngine`; blocks until the
    last request finishes. Runs its own event loop (asyncio, uvloop when installed);
    from async code use `replay_realtime_async`.

    Args:
        requests: in any order; arrival times are offsets in seconds (the first
            arrival is submitted at once).
        config: the instance's configuration.
        policy: a policy instance or a registered name.
        runner: a real runner (its cache the device tier of `store`) or any other.
        store: the KV store; for a real runner, the one its cache belongs to.
        time_scale: multiplies arrival offsets (0.5 replays twice as fast).
        clock: the engine's clock, seconds from the start of the replay (it must read
            about 0 when called); by default `time.monotonic` from the call. Pass your
            own to put what you measure on the engine's time line.

    Raises:
        ValueError: `time_scale` is not positive.
    """
    result: ReplayResult = run_blocking(
        replay_realtime_async, requests, config, policy, runner, store, time_scale, clock
    )
    return result


async def replay_realtime_async(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: Policy | str,
    runner: ModelRunner,
    store: KVStore | None = None,
    time_scale: float = 1.0,
    clock: Callable[[], float] | None = None,
) -> ReplayResult:
    """`replay_realtime` on the running event loop."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    name, policy = resolve_policy(policy, config)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    first = pending[0].arrival_time if pending else 0.0
    wall_start = time.perf_counter()
    clock = clock or seconds_since_now()

    states: list[RequestState] = []
    engine = AsyncEngine(
        config, runner, policy, store, max_num_pending=max(1, len(pending)), clock=clock
    )
    async with engine, anyio.create_task_group() as tg:
        for request in pending:
            delay = (request.arrival_time - first) * time_scale - clock()
            if delay > 0:
                await anyio.sleep(delay)
            states.append(_submit(engine, request, tg))
    # `async with engine` has drained the engine and its store's copies.
    scheduler = engine.scheduler
    return ReplayResult(
        policy=name,
        states=states,
        stats=scheduler.stats,
        store_stats=scheduler.store.stats,
        num_leaked_blocks=scheduler.num_leaked_blocks(),
        end_time=clock(),
        wall_s=time.perf_counter() - wall_start,
    )


def seconds_since_now() -> Callable[[], float]:
    """A clock reading seconds since this call (`time.monotonic`)."""
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    return clock


def _submit(engine: AsyncEngine, request: Request, tg: TaskGroup) -> RequestState:
    # A trace gives output lengths: a model's EOS must not cut them short.
    sampling = dataclasses.replace(request.sampling, ignore_eos=True)
    stream = engine.submit(dataclasses.replace(request, sampling=sampling))

    async def drain() -> None:
        async with stream.receive:
            async for _ in stream.receive:
                pass

    tg.start_soon(drain)
    return stream.state


__all__ = ["fit_to_vocab", "replay_realtime", "replay_realtime_async", "seconds_since_now"]
