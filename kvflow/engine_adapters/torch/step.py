"""What the torch and Hugging Face runners' `execute` share: which plan entries run,
and the step's result."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from kvflow.request import RequestState, RequestStatus, TokenLogprobs
from kvflow.scheduler.plan import StepPlan, StepResult


def live_entries(plan: StepPlan) -> Iterator[tuple[int, RequestState, int, int]]:
    """`(index, request, start, end)` of each entry whose request is not finished; one
    aborted since the plan has lost its blocks, and commit skips it."""
    for i, req in enumerate(plan.requests):
        if req.status is RequestStatus.FINISHED:
            continue
        start = plan.start_positions[i]
        yield i, req, start, start + plan.num_tokens[i]


def step_result(
    plan: StepPlan,
    sampling: Sequence[int],
    tokens: Sequence[int],
    device: torch.device,
    began: float,
    logprobs: Sequence[TokenLogprobs | None] | None = None,
) -> StepResult:
    """The sampled `tokens` (and their `logprobs`, when any request asked) placed at the
    entries `sampling` (None elsewhere), and the wall time since `began`
    (`time.perf_counter()`) with the CUDA stream synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sampled: list[int | None] = [None] * len(plan.requests)
    for i, token in zip(sampling, tokens, strict=True):
        sampled[i] = token
    placed: list[TokenLogprobs | None] | None = None
    if logprobs is not None:
        placed = [None] * len(plan.requests)
        for i, lp in zip(sampling, logprobs, strict=True):
            placed[i] = lp
    return StepResult(sampled, time.perf_counter() - began, placed)
