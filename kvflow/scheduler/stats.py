"""Counters the scheduler keeps as it runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    prefix_hit_tokens: int = 0
    """Tokens found cached at admission, summed over admissions (re-admissions too)."""
    prefix_query_tokens: int = 0
    """Tokens looked up at admission, summed over admissions."""
    hit_tokens_by_tier: dict[str, int] = field(
        default_factory=lambda: {"device": 0, "cpu": 0, "disk": 0}
    )
    """Hit tokens by the tier they were served from (loads from cpu/disk included)."""
    num_swaps: int = 0
    """Preemptions that kept the victim's blocks (demoted to cpu) rather than dropping them."""

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_query_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens
