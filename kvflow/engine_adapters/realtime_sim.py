"""The simulated runner in real time: `kvflow serve --engine sim`.

Each step sleeps as long as the latency model says it takes, in the worker thread the
async engine runs `execute` in (the event loop keeps serving meanwhile), and samples
pseudo-random token ids that are a pure function of (request id, output index): a fleet
of such instances behaves like real ones in time and in shape, without a GPU.
"""

from __future__ import annotations

import time

import xxhash

from kvflow.config import SimRunnerConfig
from kvflow.engine_adapters.simulated import (
    LatencyModel,
    SimulatedRunner,
    latency_model_from_config,
)
from kvflow.request import RequestStatus
from kvflow.scheduler.plan import StepPlan, StepResult

SIM_VOCAB_SIZE = 32000
"""Token ids the real-time simulated runner samples lie in [SIM_FIRST_TOKEN_ID, this)."""
SIM_FIRST_TOKEN_ID = 256
"""Ids below this are never sampled (room for special tokens a client might name)."""

_SEED = 0x6B76_7369_6D  # "kvsim"


def sim_token_id(request_id: str, output_index: int) -> int:
    """The token the simulated runner samples for a request's `output_index`-th output:
    the same in every process, so a request's output is reproducible."""
    digest = xxhash.xxh64_intdigest(f"{request_id}:{output_index}".encode(), _SEED)
    return SIM_FIRST_TOKEN_ID + digest % (SIM_VOCAB_SIZE - SIM_FIRST_TOKEN_ID)


class RealTimeSimRunner(SimulatedRunner):
    """A `SimulatedRunner` whose steps take their modelled time on the wall clock.

    Args:
        latency: the step-time model (all zeros: steps return at once).
    """

    name = "sim"
    supports_overlap = True

    def __init__(self, latency: LatencyModel) -> None:
        super().__init__(latency)

    @classmethod
    def from_config(cls, config: SimRunnerConfig) -> RealTimeSimRunner:
        return cls(latency_model_from_config(config))

    def execute(self, plan: StepPlan) -> StepResult:
        """Sleep the runner's share of the modelled step (the engine's own terms,
        `step_overhead_ms` and `seq_overhead_us`, are what the engine around it spends
        for real), then return the sampled tokens."""
        began = time.perf_counter()
        duration = self.step_time_s(plan, runner_only=True)
        sampled: list[int | None] = []
        for i, req in enumerate(plan.requests):
            # The scheduler appends the token at commit: this one is output number
            # num_output_tokens (plus any sampled by a step still in flight).
            if req.status is RequestStatus.FINISHED or not plan.samples(i):
                sampled.append(None)
            else:
                sampled.append(sim_token_id(req.request_id, req.num_output_tokens))
        remaining = duration - (time.perf_counter() - began)
        if remaining > 0:
            time.sleep(remaining)
        return StepResult(sampled, duration)


__all__ = ["SIM_FIRST_TOKEN_ID", "SIM_VOCAB_SIZE", "RealTimeSimRunner", "sim_token_id"]
