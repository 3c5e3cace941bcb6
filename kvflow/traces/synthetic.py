"""Deterministic synthetic workloads.

The same arguments give the same records in every process. Each random aspect (arrivals,
groups, lengths, tenants) draws from its own seeded stream, so changing one option does
not reshuffle the others.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from kvflow.request import SLO
from kvflow.traces.native import TraceRecord
from kvflow.traces.tokens import name_seed

LengthSpec = int | tuple[int, int]
"""A fixed length, or (lo, hi): uniform over lo..hi inclusive."""


def _stream(seed: int, aspect: str) -> random.Random:
    return random.Random(name_seed(f"synthetic:{seed}:{aspect}"))


def _length_sampler(name: str, spec: LengthSpec, minimum: int) -> tuple[int, int]:
    lo, hi = (spec, spec) if isinstance(spec, int) else spec
    if not minimum <= lo <= hi:
        raise ValueError(
            f"{name} must be an int >= {minimum} or (lo, hi) with lo <= hi, got {spec!r}"
        )
    return lo, hi


def poisson_arrivals(num_requests: int, rate_rps: float | None, *, seed: int = 0) -> list[float]:
    """Arrival times in seconds of a Poisson process at `rate_rps` (all 0.0 when None),
    rounded to microseconds."""
    if rate_rps is None:
        return [0.0] * num_requests
    if not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0 or None, got {rate_rps!r}")
    rng = _stream(seed, "arrivals")
    gaps = (rng.expovariate(rate_rps) for _ in range(num_requests))
    return [round(t, 6) for t in itertools.accumulate(gaps)]


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
    suffix_lo, suffix_hi = _length_sampler("suffix_len", suffix_len, 1)
    output_lo, output_hi = _length_sampler("output_len", output_len, 1)

    arrivals = poisson_arrivals(num_requests, rate_rps, seed=seed)
    shared = num_groups > 0 and prefix_len > 0
    group_weights = list(itertools.accumulate((i + 1) ** -group_skew for i in range(num_groups)))
    group_rng, suffix_rng = _stream(seed, "groups"), _stream(seed, "suffix")
    output_rng, tenant_rng = _stream(seed, "output"), _stream(seed, "tenants")
    records = []
    for index, arrival_s in enumerate(arrivals):
        suffix = suffix_rng.randint(suffix_lo, suffix_hi)
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
                output_len=output_rng.randint(output_lo, output_hi),
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
