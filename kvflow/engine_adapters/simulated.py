"""A runner that computes nothing and takes the time a latency model says."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from kvflow.config import ConfigError, SimRunnerConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.scheduler.plan import StepPlan, StepResult


class StepFeatures(NamedTuple):
    """The counts of one step that the latency model prices (see `LatencyModel`)."""

    num_prefill_tokens: int
    """Tokens of entries computing more than one token: sum of chunk lengths l."""
    num_decode_seqs: int
    """Entries computing one token."""
    num_kv_tokens: int
    """Context attended, summed over entries: start + n per entry."""
    prefill_attn_pairs: int = 0
    """Query x key pairs of the prefill chunks' attention: sum of l * (start + l)."""
    num_prefill_seqs: int = 0
    """Prefill chunks (entries computing more than one token)."""
    decode_padded_kv: int = 0
    """Decode sequences x the longest decode context: what a padded decode batch reads."""
    num_seqs: int = 0
    """Entries of the step (each one the engine commits and streams to)."""

    @classmethod
    def of(cls, plan: StepPlan) -> StepFeatures:
        """The features of a plan."""
        attn = num_prefills = max_ctx = 0
        for start, n in zip(plan.start_positions, plan.num_tokens, strict=True):
            if n > 1:
                attn += n * (start + n)
                num_prefills += 1
            elif start + 1 > max_ctx:
                max_ctx = start + 1
        return cls(
            plan.num_prefill_tokens,
            plan.num_decode_tokens,
            plan.num_kv_tokens,
            attn,
            num_prefills,
            plan.num_decode_tokens * max_ctx,
            len(plan.requests),
        )


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """One step's time as a sum of priced counts (`StepFeatures`):

        fixed + prefill tokens * a + decode sequences * b + KV tokens * c
        + prefill attention pairs * d + prefill chunks * e + padded decode KV * f
        + engine overhead per step + engine overhead per entry * entries

    The first four terms are the original linear model (weights read once per step,
    the per-token matmuls of prefill, the per-sequence work of decode, KV read by
    attention). The others are what a measured engine needs besides, each 0 unless
    calibrated, so a model of the first four alone prices a step as before:

    - prefill attention grows with chunk length times context (DistServe models prefill
      as a + b * sum(l) + c * sum(l^2)); a chunk of l tokens after `start` cached ones
      scores l * (start + l) query/key pairs. kvflow's torch runner computes that whole
      rectangle (masked, not skipped); a causal kernel computes about l * (start + l/2),
      the same feature up to how the coefficient splits with sum(l^2).
    - each prefill chunk is its own attention call (mask, KV gather, launch);
    - a padded decode batch reads the longest context for every sequence;
    - the async engine's own work (thread hop, commit, streaming each entry's tokens)
      around the runner's execute.
    """

    fixed_ms: float
    prefill_token_us: float
    decode_seq_us: float
    kv_token_ns: float
    prefill_attn_ns: float = 0.0
    prefill_seq_us: float = 0.0
    decode_padded_kv_ns: float = 0.0
    step_overhead_ms: float = 0.0
    seq_overhead_us: float = 0.0

    def step_time_s(
        self, num_prefill_tokens: int, num_decode_seqs: int, num_kv_tokens: int
    ) -> float:
        """The first four terms' time (the features a plan's totals give)."""
        return (
            self.fixed_ms * 1e-3
            + num_prefill_tokens * self.prefill_token_us * 1e-6
            + num_decode_seqs * self.decode_seq_us * 1e-6
            + num_kv_tokens * self.kv_token_ns * 1e-9
        )

    def terms_s(self, f: StepFeatures) -> tuple[float, ...]:
        """Each term's seconds for `f`, in `TERMS` order."""
        return (
            self.fixed_ms * 1e-3,
            f.num_prefill_tokens * self.prefill_token_us * 1e-6,
            f.num_decode_seqs * self.decode_seq_us * 1e-6,
            f.num_kv_tokens * self.kv_token_ns * 1e-9,
            f.prefill_attn_pairs * self.prefill_attn_ns * 1e-9,
            f.num_prefill_seqs * self.prefill_seq_us * 1e-6,
            f.decode_padded_kv * self.decode_padded_kv_ns * 1e-9,
            self.step_overhead_ms * 1e-3,
            f.num_seqs * self.seq_overhead_us * 1e-6,
        )

    def features_time_s(self, f: StepFeatures) -> float:
        """The whole model's time for a step of features `f`."""
        return math.fsum(self.terms_s(f))

    def runner_time_s(self, f: StepFeatures) -> float:
        """The runner's share of a step of features `f`: every term but the engine's
        (`ENGINE_TERMS`), which a real engine spends itself around the runner."""
        terms = self.terms_s(f)
        return math.fsum(terms[: len(terms) - len(ENGINE_TERMS)])

    @property
    def is_linear(self) -> bool:
        """Only the first four terms are priced (`step_time_s` is the whole model)."""
        return not (
            self.prefill_attn_ns
            or self.prefill_seq_us
            or self.decode_padded_kv_ns
            or self.step_overhead_ms
            or self.seq_overhead_us
        )


TERMS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LatencyModel))
"""The coefficients' names, in `LatencyModel.terms_s` order (as preset files hold them)."""
ENGINE_TERMS = ("step_overhead_ms", "seq_overhead_us")
"""The engine's terms (measured around execute); the others price the runner's step."""


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
    explicit = {name: getattr(config, name) for name in TERMS}
    return dataclasses.replace(base, **{k: v for k, v in explicit.items() if v is not None})


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

    def step_time_s(self, plan: StepPlan, *, runner_only: bool = False) -> float:
        """The modelled time of `plan`'s step; with `runner_only`, the runner's share
        (`LatencyModel.runner_time_s`)."""
        latency = self.latency
        if latency.is_linear:  # the common case needs only the plan's totals
            return latency.step_time_s(
                plan.num_prefill_tokens, plan.num_decode_tokens, plan.num_kv_tokens
            )
        features = StepFeatures.of(plan)
        if runner_only:
            return latency.runner_time_s(features)
        return latency.features_time_s(features)

    def execute(self, plan: StepPlan) -> StepResult:
        duration = self.step_time_s(plan)
        return StepResult([self.filler_token_id] * len(plan.requests), duration)
