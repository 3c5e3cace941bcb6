"""Prefill/decode disaggregation: what crosses from a prefill instance to a decode
instance (a `Handoff`), the request the decode instance continues, and the request
states of both halves joined back into one per request for the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvflow.request import Request, RequestState


@dataclass(frozen=True, slots=True)
class Handoff:
    """A request's prompt KV handed from its prefill instance to a decode instance."""

    request_id: str
    source: int
    target: int
    num_tokens: int
    """Prompt tokens handed off (its full blocks)."""
    num_bytes: int
    start: float
    end: float


def _derived(request: Request, **changes: Any) -> Request:
    """`dataclasses.replace(request, **changes)` without `Request.__post_init__`: the
    fields not in `changes` were checked when `request` was made, the caller keeps
    `changes` valid (and `prompt_array` in step with `prompt_token_ids`), and the copy
    shares the prompt's tuple and packed array (repacking a prompt of thousands of
    tokens for every request dominated a disaggregated replay)."""
    copy = object.__new__(Request)
    for name in Request.__slots__:
        object.__setattr__(copy, name, changes.get(name, getattr(request, name)))
    return copy


def prefill_request(original: Request) -> Request:
    """The copy a prefill instance serves: asking for the first token alone."""
    return _derived(original, max_new_tokens=1)


def decode_request(original: Request, prefilled: RequestState, arrival_time: float) -> Request:
    """The request a decode instance continues: the prompt and the first token (made on
    the prefill instance) as its prompt, the remaining tokens to generate, arriving when
    the handoff lands (its TTFT deadline is the original's affair, already met or not)."""
    prompt = original.prompt_token_ids
    made = prefilled.token_ids
    return _derived(
        original,
        prompt_token_ids=tuple(prompt) + tuple(made[len(prompt) :]),  # no copy of a tuple
        prompt_array=made[:],
        max_new_tokens=original.max_new_tokens - 1,
        arrival_time=arrival_time,
        deadline=None,
    )


def merge_halves(
    prefilled: Sequence[RequestState],
    decoded: Sequence[RequestState],
    originals: Mapping[str, Request],
) -> list[RequestState]:
    """One state per request, in the prefill halves' order: the prefill half's arrival,
    first token and cache hits joined with the decode half's later tokens and end.
    A request that never reached a decode instance (one token asked, or it stopped or
    was rejected at prefill) is its prefill state as is."""
    by_id = {s.request_id: s for s in decoded}
    merged: list[RequestState] = []
    for first in prefilled:
        second = by_id.get(first.request_id)
        original = originals.get(first.request_id)
        if second is None or original is None:
            merged.append(first)
            continue
        state = RequestState(original)
        state.token_ids = second.token_ids
        state.num_computed_tokens = second.num_computed_tokens
        state.num_cached_tokens = first.num_cached_tokens
        state.status = second.status
        state.finish_reason = second.finish_reason
        state.finish_detail = second.finish_detail
        state.first_scheduled_time = first.first_scheduled_time
        state.first_token_time = first.first_token_time
        state.token_times = first.token_times + second.token_times
        state.finish_time = second.finish_time
        state.num_preemptions = first.num_preemptions + second.num_preemptions
        state.kv_wait_s = first.kv_wait_s + second.kv_wait_s
        merged.append(state)
    return merged
