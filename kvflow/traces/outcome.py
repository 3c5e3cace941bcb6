"""What became of one request: its latencies and whether it met its SLOs.

A request meets its SLOs when its TTFT, its TPOT (if it has more than one output token)
and its first token's time are within `slo.ttft_ms`, `slo.tpot_ms` and `deadline`,
each where set; a request with none meets them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kvflow.config import KVFlowConfig
from kvflow.request import FinishReason, RequestState

SERVED = frozenset({FinishReason.LENGTH, FinishReason.STOP})
"""Finish reasons of served requests, the only ones latencies and SLOs count."""
_SLO_RTOL = 1e-9  # float noise in (t1 - t0) * 1000 must not fail an SLO met exactly


def is_within(value: float, limit: float | None) -> bool:
    """`value` meets the objective `limit` (None: no objective), up to float noise."""
    return limit is None or value <= limit * (1 + _SLO_RTOL)


class RequestOutcome(NamedTuple):
    """The latencies of one served request in seconds (None where undefined) and whether
    it met its SLOs."""

    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    queue_s: float | None
    met: bool

    @property
    def latencies_s(self) -> tuple[float | None, float | None, float | None, float | None]:
        """(TTFT, TPOT, E2E, queue) in seconds."""
        return self.ttft_s, self.tpot_s, self.e2e_s, self.queue_s


def request_outcome(state: RequestState) -> RequestOutcome:
    """The latencies and SLO verdict of one request that produced tokens (the metrics'
    definitions, per request: what the run's summaries are made of)."""
    arrival = state.arrival_time
    slo = state.request.slo
    met = True
    ttft_s = tpot_s = e2e_s = queue_s = None
    if state.first_scheduled_time is not None:
        queue_s = state.first_scheduled_time - arrival
    first_token = state.first_token_time
    if first_token is None and state.token_times:
        first_token = state.token_times[0]
    if first_token is not None:
        ttft_s = first_token - arrival
        met &= is_within(ttft_s * 1000.0, slo.ttft_ms)
        deadline = state.request.deadline
        met &= deadline is None or is_within(first_token, deadline)
    if state.finish_time is not None:
        e2e_s = state.finish_time - arrival
        num_outputs = state.num_output_tokens
        if first_token is not None and num_outputs > 1:
            tpot_s = (state.finish_time - first_token) / (num_outputs - 1)
            met &= is_within(tpot_s * 1000.0, slo.tpot_ms)
    return RequestOutcome(ttft_s, tpot_s, e2e_s, queue_s, met)


def nothing_served_reason(states: Sequence[RequestState], config: KVFlowConfig) -> str | None:
    """Why a run with requests served none of them, in one line (None when it served
    some, or had none), e.g. ``all 400 requests rejected: each needs >= 68 blocks of 16
    tokens, the device tier holds 1``.

    Args:
        states: every request of the run, finished.
        config: the run's configuration (the limits a request is rejected by).
    """
    if not states or any(s.finish_reason in SERVED for s in states):
        return None
    n = len(states)
    rejected = [s for s in states if s.finish_reason == FinishReason.REJECTED]
    if len(rejected) < n:
        first = next(s for s in states if s.finish_reason != FinishReason.REJECTED)
        return (
            f"none of {n} requests served ({len(rejected)} rejected, {n - len(rejected)} "
            f"ended otherwise; the first: {first.finish_reason}, {first.finish_detail!r})"
        )
    # The scheduler's admission limits, smallest request first: if it fails one, all do.
    smallest = min(s.num_prompt_tokens + s.max_new_tokens for s in rejected)
    max_len = config.scheduler.max_model_len
    if smallest > max_len:
        return (
            f"all {n} requests rejected: each has >= {smallest} tokens (prompt + "
            f"max_new_tokens), scheduler.max_model_len is {max_len}"
        )
    block_size = config.kv.block_size
    num_blocks = -(-smallest // block_size)
    device_blocks = config.kv.tier_blocks("device")
    if num_blocks > device_blocks:
        return (
            f"all {n} requests rejected: each needs >= {num_blocks} blocks of {block_size} "
            f"tokens, the device tier holds {device_blocks}"
        )
    return f"all {n} requests rejected; the first: {rejected[0].finish_detail}"
