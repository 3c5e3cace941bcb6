"""A runner that computes nothing and takes the time a latency model says."""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.config import ConfigError, SimRunnerConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.scheduler.plan import StepPlan, StepResult


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """step time = fixed + prefill tokens * a + decode sequences * b + KV tokens * c."""

    fixed_ms: float
    prefill_token_us: float
    decode_seq_us: float
    kv_token_ns: float

    def step_time_s(
        self, num_prefill_tokens: int, num_decode_seqs: int, num_kv_tokens: int
    ) -> float:
        return (
            self.fixed_ms * 1e-3
            + num_prefill_tokens * self.prefill_token_us * 1e-6
            + num_decode_seqs * self.decode_seq_us * 1e-6
            + num_kv_tokens * self.kv_token_ns * 1e-9
        )


PRESETS: dict[str, LatencyModel] = {
    # Rough roofline of Llama-3-8B in bf16 on one H100 SXM: 16 GB of weights read per
    # step at ~3.3 TB/s (~5 ms), ~16 GFLOP per token at ~50% of 989 TFLOP/s (~32 us per
    # prefill token), 128 KiB of KV per token read at ~3.3 TB/s (~40 ns per token).
    "llama3-8b-h100": LatencyModel(
        fixed_ms=5.0, prefill_token_us=32.0, decode_seq_us=20.0, kv_token_ns=40.0
    ),
    # Llama-3-70B in bf16 on 4 x H100 with tensor parallelism (same method).
    "llama3-70b-4xh100": LatencyModel(
        fixed_ms=12.0, prefill_token_us=75.0, decode_seq_us=45.0, kv_token_ns=25.0
    ),
    # A tiny model on a CPU, for quick experiments.
    "tiny-cpu": LatencyModel(
        fixed_ms=1.0, prefill_token_us=5.0, decode_seq_us=50.0, kv_token_ns=1.0
    ),
}


def latency_model_from_config(config: SimRunnerConfig) -> LatencyModel:
    """The preset file or the named preset of the config, with explicitly set fields
    overriding it."""
    if config.preset_file is not None:
        from kvflow.engine_adapters.calibrate import read_preset

        base = read_preset(config.preset_file)
    elif config.preset is None:
        base = LatencyModel(0.0, 0.0, 0.0, 0.0)
    elif config.preset in PRESETS:
        base = PRESETS[config.preset]
    else:
        raise ConfigError(
            f"sim.preset={config.preset!r} is not a known preset; known: {', '.join(PRESETS)}"
        )
    return LatencyModel(
        fixed_ms=base.fixed_ms if config.fixed_ms is None else config.fixed_ms,
        prefill_token_us=(
            base.prefill_token_us if config.prefill_token_us is None else config.prefill_token_us
        ),
        decode_seq_us=base.decode_seq_us if config.decode_seq_us is None else config.decode_seq_us,
        kv_token_ns=base.kv_token_ns if config.kv_token_ns is None else config.kv_token_ns,
    )


class SimulatedRunner(ModelRunner):
    """Samples `filler_token_id` for every entry that samples; output lengths therefore
    come from `max_new_tokens` (traces' output lengths), never from stop tokens."""

    name = "sim"
    supports_overlap = True

    def __init__(self, latency: LatencyModel, filler_token_id: int = 0) -> None:
        self.latency = latency
        self.filler_token_id = filler_token_id

    @classmethod
    def from_config(cls, config: SimRunnerConfig) -> SimulatedRunner:
        return cls(latency_model_from_config(config))

    def execute(self, plan: StepPlan) -> StepResult:
        duration = self.latency.step_time_s(
            plan.num_prefill_tokens, plan.num_decode_tokens, plan.num_kv_tokens
        )
        return StepResult([self.filler_token_id] * len(plan.requests), duration)
