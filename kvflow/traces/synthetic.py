"""Deterministic synthetic workloads.

The same arguments give the same records in every process. Each random aspect (arrivals,
groups, lengths, tenants, turns) draws from its own seeded stream, so changing one option
does not reshuffle the others.

- `shared_prefix_workload`: single requests sharing system prompts (the bundled sample).
- `generate_workload(WorkloadSpec(...))`: sessions of one or more turns, Poisson or
  gamma (bursty) arrivals, any length distributions, shared system prompts, think time
  between turns, several tenants with their own SLOs, priorities and weights.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow.kv.capacity import available_ram_bytes, human_bytes
from kvflow.request import SLO
from kvflow.traces.distributions import (
    ArrivalProcess,
    Fixed,
    Gamma,
    LengthDist,
    LengthSpec,
    Poisson,
    as_length_dist,
)
from kvflow.traces.limits import BYTES_PER_PROMPT_TOKEN, BYTES_PER_REQUEST, MAX_TRACE_TOKENS
from kvflow.traces.native import TraceRecord
from kvflow.traces.tokens import group_prefix_token_ids, name_seed

__all__ = [
    "LengthSpec",
    "SystemPrompts",
    "TenantSpec",
    "WorkloadSpec",
    "check_workload",
    "gamma_arrivals",
    "generate_workload",
    "poisson_arrivals",
    "shared_prefix_workload",
]


def _stream(seed: int, aspect: str) -> random.Random:
    return random.Random(name_seed(f"synthetic:{seed}:{aspect}"))


def poisson_arrivals(num_requests: int, rate_rps: float | None, *, seed: int = 0) -> list[float]:
    """Arrival times in seconds of a Poisson process at `rate_rps` (all 0.0 when None),
    rounded to microseconds."""
    if rate_rps is None:
        return [0.0] * num_requests
    if not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0 or None, got {rate_rps!r}")
    return Poisson(rate_rps).times(num_requests, _stream(seed, "arrivals"))


def gamma_arrivals(num_requests: int, rate_rps: float, cv: float, *, seed: int = 0) -> list[float]:
    """Arrival times in seconds with gamma-distributed gaps: mean rate `rate_rps`,
    coefficient of variation `cv` of the gaps (> 1: bursty), rounded to microseconds."""
    return Gamma(rate_rps, cv).times(num_requests, _stream(seed, "arrivals"))


def _zipf_cum_weights(n: int, skew: float) -> list[float]:
    return list(itertools.accumulate((i + 1) ** -skew for i in range(n)))


def shared_prefix_workload(
    num_requests: int,
    *,
    num_groups: int,
    prefix_len: int,
    suffix_len: LengthSpec,
    output_len: LengthSpec,
    rate_rps: float | None = None,
    num_tenants: int = 1,
    tenant_slos: Sequence[SLO | None] | None = None,
    tenant_priorities: Sequence[int] | None = None,
    group_skew: float = 0.0,
    seed: int = 0,
) -> list[TraceRecord]:
    """Requests that share system prompts: each takes `prefix_len` tokens of one of
    `num_groups` groups, then a suffix of its own.

    Args:
        num_requests: how many records, ids ``r0`` .. ``r{n-1}`` in arrival order.
        num_groups: prefix groups, named ``s{seed}-g{i}``; 0 means no shared prefix.
        prefix_len: shared tokens per request (0: none).
        suffix_len: the request's own prompt tokens after the prefix (>= 1).
        output_len: output tokens (>= 1).
        rate_rps: Poisson arrival rate; None puts every arrival at t=0.
        num_tenants: tenants ``t0`` .. ``t{n-1}``, picked uniformly.
        tenant_slos: one SLO (or None) per tenant.
        tenant_priorities: one priority per tenant (lower is more important).
        group_skew: Zipf exponent of group popularity (group i has weight
            1/(i+1)**skew); 0 picks groups uniformly.
        seed: the whole workload is a function of the arguments and this seed.

    Returns:
        Records with `prompt_len`/`prefix_group`/`prefix_len` (tokens are built on
        `TraceRecord.to_request()` or load), ready for `dump_native`.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests!r}")
    if num_groups < 0 or prefix_len < 0:
        raise ValueError(
            f"num_groups and prefix_len must be >= 0, got {num_groups!r} and {prefix_len!r}"
        )
    if num_tenants < 1:
        raise ValueError(f"num_tenants must be >= 1, got {num_tenants!r}")
    if tenant_slos is not None and len(tenant_slos) != num_tenants:
        raise ValueError(f"tenant_slos has {len(tenant_slos)} entries for {num_tenants} tenants")
    if tenant_priorities is not None and len(tenant_priorities) != num_tenants:
        raise ValueError(
            f"tenant_priorities has {len(tenant_priorities)} entries for {num_tenants} tenants"
        )
    if group_skew < 0:
        raise ValueError(f"group_skew must be >= 0, got {group_skew!r}")
    suffix_dist = as_length_dist("suffix_len", suffix_len)
    output_dist = as_length_dist("output_len", output_len)

    arrivals = poisson_arrivals(num_requests, rate_rps, seed=seed)
    shared = num_groups > 0 and prefix_len > 0
    group_weights = _zipf_cum_weights(num_groups, group_skew)
    group_rng, suffix_rng = _stream(seed, "groups"), _stream(seed, "suffix")
    output_rng, tenant_rng = _stream(seed, "output"), _stream(seed, "tenants")
    records = []
    for index, arrival_s in enumerate(arrivals):
        suffix = suffix_dist.sample(suffix_rng)
        tenant_index = tenant_rng.randrange(num_tenants)
        slo = tenant_slos[tenant_index] if tenant_slos is not None else None
        group = None
        if shared:
            group_index = group_rng.choices(range(num_groups), cum_weights=group_weights)[0]
            group = f"s{seed}-g{group_index}"
        records.append(
            TraceRecord(
                request_id=f"r{index}",
                arrival_s=arrival_s,
                output_len=output_dist.sample(output_rng),
                prompt_len=(prefix_len if shared else 0) + suffix,
                prefix_group=group,
                prefix_len=prefix_len if shared else 0,
                tenant=f"t{tenant_index}",
                priority=tenant_priorities[tenant_index] if tenant_priorities is not None else 0,
                ttft_slo_ms=slo.ttft_ms if slo is not None else None,
                tpot_slo_ms=slo.tpot_ms if slo is not None else None,
            )
        )
    return records


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """A tenant of a synthetic workload: its name, share of sessions, SLO and priority."""

    name: str
    weight: float = 1.0
    slo: SLO = field(default_factory=SLO)
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tenant needs a non-empty name")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"tenant {self.name!r}: weight must be > 0, got {self.weight!r}")


@dataclass(frozen=True, slots=True)
class SystemPrompts:
    """`num_prompts` system prompts of `num_tokens` tokens, named ``s{seed}-g{i}``; each
    session opens with one, prompt i picked with weight 1/(i+1)**skew."""

    num_prompts: int
    num_tokens: int
    skew: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.num_tokens < 1:
            raise ValueError(
                f"system prompts need num_prompts >= 1 and num_tokens >= 1, got "
                f"{self.num_prompts!r} and {self.num_tokens!r}"
            )
        if not self.skew >= 0:
            raise ValueError(f"system prompt skew must be >= 0, got {self.skew!r}")


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A synthetic workload of sessions (see `generate_workload`).

    Attributes:
        num_sessions: sessions; with one turn each, that is the number of requests.
        prompt_len: the user's new tokens per turn (>= 1).
        output_len: output tokens per turn (>= 1).
        arrivals: when sessions start (`Poisson`, `Gamma`, `AllAtOnce`).
        turns: turns per session (>= 1).
        think_time_s: seconds between the arrivals of a session's turns.
        system_prompts: shared system prompts opening each session, or None.
        tenants: who sends the sessions, picked by weight.
        seed: the workload is a function of the spec and this seed.
    """

    num_sessions: int
    prompt_len: LengthDist
    output_len: LengthDist
    arrivals: ArrivalProcess = field(default_factory=lambda: Poisson(1.0))
    turns: LengthDist = field(default_factory=lambda: Fixed(1))
    think_time_s: float = 0.0
    system_prompts: SystemPrompts | None = None
    tenants: tuple[TenantSpec, ...] = (TenantSpec("default"),)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sessions < 0:
            raise ValueError(f"num_sessions must be >= 0, got {self.num_sessions!r}")
        as_length_dist("prompt_len", self.prompt_len)
        as_length_dist("output_len", self.output_len)
        as_length_dist("turns", self.turns)
        if not (math.isfinite(self.think_time_s) and self.think_time_s >= 0):
            raise ValueError(f"think_time_s must be >= 0, got {self.think_time_s!r}")
        if not self.tenants:
            raise ValueError("a workload needs at least one tenant")
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique, got {names!r}")


def generate_workload(spec: WorkloadSpec) -> list[TraceRecord]:
    """The records of a synthetic workload, ordered by arrival.

    Session i starts at the i-th arrival; its turn k arrives ``k * think_time_s`` later.
    Turn k's prompt is the session's system prompt (if any), then every earlier turn's
    user tokens and output, then turn k's user tokens, so turn k's prompt is an exact
    prefix of turn k + 1's (the outputs are the trace's, not a runner's). Sessions of
    the same system prompt share exactly its tokens.

    Requests are ``r{i}`` when every session has one turn, else ``s{i}-{k}``. Records
    are compact (`prompt_len` and `prefix_group`, as `dump_native` writes them) except
    for multi-turn sessions under a system prompt, which carry their token ids.
    """
    check_workload(spec)
    seed = spec.seed
    starts = spec.arrivals.times(spec.num_sessions, _stream(seed, "arrivals"))
    turns_rng, prompt_rng = _stream(seed, "turns"), _stream(seed, "prompt")
    output_rng, tenant_rng = _stream(seed, "output"), _stream(seed, "tenants")
    system_rng = _stream(seed, "groups")
    tenant_weights = list(itertools.accumulate(t.weight for t in spec.tenants))
    system = spec.system_prompts
    system_weights = _zipf_cum_weights(system.num_prompts, system.skew) if system else []
    single_turn = isinstance(spec.turns, Fixed) and spec.turns.value == 1
    records: list[TraceRecord] = []
    for i, start in enumerate(starts):
        tenant = tenant_rng.choices(spec.tenants, cum_weights=tenant_weights)[0]
        num_turns = spec.turns.sample(turns_rng)
        group = None
        history = 0
        if system is not None:
            g = system_rng.choices(range(system.num_prompts), cum_weights=system_weights)[0]
            group, history = f"s{seed}-g{g}", system.num_tokens
        for k in range(num_turns):
            prompt_len = history + spec.prompt_len.sample(prompt_rng)
            output_len = spec.output_len.sample(output_rng)
            if max(prompt_len, output_len) > MAX_TRACE_TOKENS:  # unbounded lengths drew it
                raise ValueError(
                    f"session {i}, turn {k}: a prompt of {prompt_len} tokens (system prompt, "
                    f"earlier turns and their outputs, new tokens) and {output_len} output "
                    f"tokens; each must be at most {MAX_TRACE_TOKENS} "
                    "(kvflow.traces.limits.MAX_TRACE_TOKENS)"
                )
            records.append(
                TraceRecord(
                    request_id=f"r{i}" if single_turn else f"s{i}-{k}",
                    arrival_s=round(start + k * spec.think_time_s, 6),
                    output_len=output_len,
                    tenant=tenant.name,
                    priority=tenant.priority,
                    ttft_slo_ms=tenant.slo.ttft_ms,
                    tpot_slo_ms=tenant.slo.tpot_ms,
                    **_prompt_fields(spec, i, group, prompt_len, single_turn),
                )
            )
            history = prompt_len + output_len
    records.sort(key=lambda r: r.arrival_s)
    return records


BYTES_PER_SYSTEM_PROMPT = 32
"""RAM a system prompt takes while a workload is generated: its cumulative popularity
weight (a float and its list slot)."""


def check_workload(spec: WorkloadSpec) -> None:
    """Refuse, before generating anything, a workload whose records could not be read
    back: a length over `MAX_TRACE_TOKENS` for every bounded distribution (a multi-turn
    prompt carries the whole session before it), more system prompts or records than
    fit in RAM (records even at their smallest).

    Raises:
        ValueError: naming the option and quoting its value.
    """
    system_len = spec.system_prompts.num_tokens if spec.system_prompts else 0
    turns, prompt = spec.turns.max_length, spec.prompt_len.max_length
    output = spec.output_len.max_length
    if output is not None and output > MAX_TRACE_TOKENS:
        raise ValueError(
            f"output_len={spec.output_len.spec()!r} gives up to {output} tokens, more than "
            f"{MAX_TRACE_TOKENS} (kvflow.traces.limits.MAX_TRACE_TOKENS)"
        )
    if turns is not None and prompt is not None and output is not None:
        longest = system_len + turns * prompt + (turns - 1) * output
        if longest > MAX_TRACE_TOKENS:
            raise ValueError(
                f"prompts of up to {longest} tokens (system_prompt_len={system_len}, "
                f"turns={spec.turns.spec()!r}, prompt_len={spec.prompt_len.spec()!r}, "
                f"output_len={spec.output_len.spec()!r}: a turn's prompt holds the "
                f"session before it), more than {MAX_TRACE_TOKENS} "
                "(kvflow.traces.limits.MAX_TRACE_TOKENS)"
            )
    available = available_ram_bytes()
    weights = 0
    if spec.system_prompts is not None:
        num_prompts = spec.system_prompts.num_prompts
        weights = num_prompts * BYTES_PER_SYSTEM_PROMPT
        if weights > available:
            raise ValueError(
                f"--system-prompts {num_prompts}: their popularity weights need "
                f"{human_bytes(weights)} of RAM; {human_bytes(available)} RAM available"
            )
    num_records = spec.num_sessions * spec.turns.min_value
    num_tokens = num_records * (system_len + spec.prompt_len.min_value)
    needed = num_records * BYTES_PER_REQUEST + num_tokens * BYTES_PER_PROMPT_TOKEN
    if needed > available - weights:  # both held at once
        left = f"{human_bytes(available - weights)} RAM available"
        if weights:
            left += " beside the system prompts' weights"
        raise ValueError(
            f"num_sessions={spec.num_sessions}: at least {num_records} requests with "
            f"{num_tokens} prompt tokens, which need {human_bytes(needed)} of RAM to "
            f"generate or replay; {left}"
        )


def _prompt_fields(
    spec: WorkloadSpec, session: int, group: str | None, prompt_len: int, single_turn: bool
) -> dict[str, Any]:
    """How a turn's prompt is written: compact (a prefix group's stream, then own
    tokens, or a whole session's stream) when one group covers the sharing, else tokens."""
    system_len = spec.system_prompts.num_tokens if spec.system_prompts else 0
    if single_turn:
        return {"prompt_len": prompt_len, "prefix_group": group, "prefix_len": system_len}
    stream = f"s{spec.seed}-sess{session}"
    if group is None:
        return {"prompt_len": prompt_len, "prefix_group": stream, "prefix_len": prompt_len}
    own = group_prefix_token_ids(stream, prompt_len - system_len)
    return {"prompt_token_ids": group_prefix_token_ids(group, system_len) + own}
