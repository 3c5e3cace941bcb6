"""Committing a step: the runner's sampled tokens are appended to their requests, full
blocks are sealed into the prefix cache, and requests that reached their length or a
stop token finish."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.request import FinishReason, RequestState, RequestStatus, TokenLogprobs
from kvflow.scheduler.kv_manager import KVManager
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.scheduler.queues import RequestQueues

# Bound once: read per request per step (see `kvflow.scheduler.queues`).
_RUNNING = RequestStatus.RUNNING
_LENGTH = FinishReason.LENGTH
_STOP = FinishReason.STOP


class Committer:
    """Applies step results to one scheduler's requests.

    Args:
        queues: the scheduler's requests (finished ones leave `running`).
        kv: the scheduler's KV manager (seals computed blocks).
        eos_token_ids: the model's end-of-sequence tokens (to name a stop's cause).
    """

    def __init__(self, queues: RequestQueues, kv: KVManager, eos_token_ids: frozenset[int]) -> None:
        self.queues = queues
        self.kv = kv
        self.block_size = kv.block_size
        self._eos_token_ids = eos_token_ids

    def commit(self, plan: StepPlan, result: StepResult, now: float) -> list[RequestState]:
        """`Scheduler.commit`: apply a step's results; returns the requests that finished."""
        sampled = result.sampled_token_ids
        if len(sampled) != len(plan.requests):
            raise ValueError(
                f"step {plan.step_id}: runner returned {len(sampled)} sampled tokens "
                f"for {len(plan.requests)} scheduled requests"
            )
        if result.logprobs is not None:
            self._commit_logprobs(plan, result.logprobs)
        bs = self.block_size
        caching = self.kv.caching
        seal = self.kv.seal
        finish = self.queues.finish
        finished: list[RequestState] = []
        entries = zip(plan.requests, plan.start_positions, plan.num_tokens, sampled, strict=True)
        for req, start, n, token in entries:
            if req.status is not _RUNNING:
                continue  # aborted since the plan
            end = start + n
            if caching and end // bs > req.num_sealed_blocks:
                seal(req, end // bs, now)
            tokens = req.token_ids
            if end != len(tokens):
                continue  # a prefill chunk short of the end samples nothing
            req.num_inflight_samples -= 1
            if token is None:
                raise ValueError(
                    f"step {plan.step_id}: no token sampled for {req.request_id!r}, "
                    "which completed its prefill"
                )
            tokens.append(token)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            if len(tokens) - req.num_prompt_tokens >= req.max_new_tokens:
                finish(req, _LENGTH, now)
                finished.append(req)
            elif token in req.stop_token_ids:
                finish(req, _STOP, now, self._stop_detail(req, token))
                finished.append(req)
        if finished:
            running = self.queues.running
            running[:] = [r for r in running if r.status is _RUNNING]
        return finished

    @staticmethod
    def _commit_logprobs(plan: StepPlan, logprobs: Sequence[TokenLogprobs | None]) -> None:
        """Keep the log-probabilities of the tokens `commit` appends (the same entries:
        running, and sampling at the end of their tokens). Apart from the token loop,
        so steps without log-probabilities pay nothing."""
        for req, start, n, lp in zip(
            plan.requests, plan.start_positions, plan.num_tokens, logprobs, strict=True
        ):
            if (
                lp is not None
                and req.logprobs is not None
                and req.status is _RUNNING
                and start + n == len(req.token_ids)
            ):
                req.logprobs.append(lp)

    def _stop_detail(self, req: RequestState, token: int) -> str:
        # The model's EOS is named first when a token is both, as vLLM checks it first.
        eos = token in self._eos_token_ids and not req.request.sampling.ignore_eos
        return f"{'eos' if eos else 'stop'} token {token}"
