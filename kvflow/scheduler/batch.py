"""The plan being built: the scheduled requests' entries and what they cost so far."""

from __future__ import annotations

from kvflow.request import RequestState


class Batch:
    """The entries of the plan being built (plain lists: this is the hot path)."""

    __slots__ = (
        "block_tables",
        "budget",
        "kv_tokens",
        "num_decode",
        "num_prefill",
        "requests",
        "starts",
        "tokens",
    )

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.requests: list[RequestState] = []
        self.tokens: list[int] = []
        self.starts: list[int] = []
        self.block_tables: list[list[int]] = []
        self.num_prefill = 0
        self.num_decode = 0
        self.kv_tokens = 0

    def add(self, req: RequestState, start: int, n: int) -> None:
        self.requests.append(req)
        self.tokens.append(n)
        self.starts.append(start)
        self.block_tables.append(req.block_ids)
        if start + n == len(req.token_ids) + req.num_inflight_samples:
            req.num_inflight_samples += 1  # this step samples the request's next token
        req.num_computed_tokens = start + n
        self.kv_tokens += start + n
        if n == 1:
            self.num_decode += 1
        else:
            self.num_prefill += n
        self.budget -= n

    def remove(self, req: RequestState) -> None:
        """Take back an entry (its request was preempted after being scheduled)."""
        i = self.requests.index(req)
        n = self.tokens.pop(i)
        start = self.starts.pop(i)
        del self.requests[i]
        del self.block_tables[i]
        self.kv_tokens -= start + n
        if n == 1:
            self.num_decode -= 1
        else:
            self.num_prefill -= n
        self.budget += n
