"""The plan being built: the scheduled requests' entries and what they cost so far."""

from __future__ import annotations

from kvflow.request import RequestState


class Batch:
    """The entries of the plan being built (plain lists: this is the hot path), named as
    `StepPlan` names them."""

    __slots__ = (
        "block_tables",
        "budget",
        "num_decode_tokens",
        "num_kv_tokens",
        "num_prefill_tokens",
        "num_tokens",
        "requests",
        "start_positions",
    )

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.requests: list[RequestState] = []
        self.num_tokens: list[int] = []
        self.start_positions: list[int] = []
        self.block_tables: list[list[int]] = []
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.num_kv_tokens = 0

    def add(self, req: RequestState, start: int, n: int) -> None:
        self.requests.append(req)
        self.num_tokens.append(n)
        self.start_positions.append(start)
        self.block_tables.append(req.block_ids)
        if start + n == len(req.token_ids) + req.num_inflight_samples:
            req.num_inflight_samples += 1  # this step samples the request's next token
        req.num_computed_tokens = start + n
        self.num_kv_tokens += start + n
        if n == 1:
            self.num_decode_tokens += 1
        else:
            self.num_prefill_tokens += n
        self.budget -= n

    def remove(self, req: RequestState) -> None:
        """Take back an entry (its request was preempted after being scheduled)."""
        i = self.requests.index(req)
        n = self.num_tokens.pop(i)
        start = self.start_positions.pop(i)
        del self.requests[i]
        del self.block_tables[i]
        self.num_kv_tokens -= start + n
        if n == 1:
            self.num_decode_tokens -= 1
        else:
            self.num_prefill_tokens -= n
        self.budget += n
