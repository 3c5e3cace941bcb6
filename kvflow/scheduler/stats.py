"""Counters the scheduler keeps as it runs."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_query_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens
