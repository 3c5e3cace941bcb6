"""Counters the scheduler keeps as it runs."""

from __future__ import annotations

from dataclasses import dataclass, field


def _by_tier() -> dict[str, int]:
    return {"device": 0, "cpu": 0, "disk": 0, "peer": 0}


@dataclass(slots=True)
class SchedulerStats:
    """Counters over a scheduler's life.

    Hits follow vLLM's split: the `prefix_*` counters and `hit_tokens_by_tier` count a
    request's first admission only (so `prefix_hit_tokens` is the sum of the requests'
    `num_cached_tokens`); a preempted request admitted again, finding its own blocks
    (swapped to cpu) or another's, counts under `readmission_*` instead.
    """

    num_steps: int = 0
    num_preemptions: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    prefix_hit_tokens: int = 0
    """Prompt tokens found cached at requests' first admissions."""
    prefix_query_tokens: int = 0
    """Prompt tokens of the requests admitted (each once); the hit rate's denominator."""
    hit_tokens_by_tier: dict[str, int] = field(default_factory=_by_tier)
    """`prefix_hit_tokens` by the tier they were served from (loads from cpu/disk and
    pulls from peers, `peer`, included)."""
    num_swaps: int = 0
    """Preemptions that kept the victim's blocks (demoted to cpu) rather than dropping them."""
    readmission_hit_tokens: int = 0
    """Tokens found cached when preempted requests were admitted again."""
    readmission_query_tokens: int = 0
    """Tokens (prompt and output so far) looked up when preempted requests were admitted
    again."""
    readmission_hit_tokens_by_tier: dict[str, int] = field(default_factory=_by_tier)
    """`readmission_hit_tokens` by the tier they were served from."""

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens found cached at first admissions / prompt tokens of those
        requests (0.0 before any admission)."""
        if self.prefix_query_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens

    def count_hits(self, first_admission: bool, tier: str, num_tokens: int) -> None:
        """Add (or, negative, take back) `num_tokens` hit tokens from `tier` to the first
        admissions' or the re-admissions' counters."""
        if first_admission:
            self.prefix_hit_tokens += num_tokens
            self.hit_tokens_by_tier[tier] += num_tokens
        else:
            self.readmission_hit_tokens += num_tokens
            self.readmission_hit_tokens_by_tier[tier] += num_tokens
