"""Hypothesis settings profiles of the guarantee tests (model-based tests and fuzzing).

Each guarantee test runs twice over: a default run sized for CI (a few seconds each,
thousands of examples in all), and a run marked `slow` (deselected by default; run it
with `python -m pytest -m slow`) with ten to twenty times the examples, that a developer
runs before submitting a change to the core. `examples(n)` is a run's settings.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

settings.register_profile(
    "guarantees",
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=True,
)
settings.register_profile(
    "guarantees-slow", parent=settings.get_profile("guarantees"), database=None
)


def examples(n: int, *, slow: bool = False, **overrides: object) -> settings:
    """Settings for `n` examples, of the slow profile when `slow` (no example database:
    a long run explores afresh)."""
    parent = settings.get_profile("guarantees-slow" if slow else "guarantees")
    return settings(parent, max_examples=n, **overrides)  # type: ignore[arg-type]


SLOW_FACTOR = 10
"""A fuzz test's slow run takes this many times its default run's cases."""


def scaled(n: int, slow: bool) -> int:
    """`n` cases in the default run, `SLOW_FACTOR * n` in the slow one."""
    return n * SLOW_FACTOR if slow else n


def store_knobs(
    *, device: tuple[int, int], cpu_max: int, disk_max: int, budget_max: int
) -> dict[str, SearchStrategy[Any]]:
    """Strategies for the store's and scheduler's knobs the model-based tests draw:
    tier sizes (a device tier of `device` blocks, cpu and disk up to `cpu_max` and
    `disk_max`), the write and load policies, the preemption mode, and the batch
    limits (a token budget up to `budget_max`)."""
    return {
        "kv.device.num_blocks": st.integers(*device),
        "kv.cpu.num_blocks": st.integers(0, cpu_max),
        "kv.disk.num_blocks": st.integers(0, disk_max),
        "kv.write_policy": st.sampled_from(
            ["write_back", "write_through", "write_through_selective"]
        ),
        "kv.write_through_threshold": st.integers(1, 2),
        "kv.load_policy": st.sampled_from(["auto", "always"]),
        "scheduler.preemption_mode": st.sampled_from(["auto", "swap", "recompute"]),
        "scheduler.max_num_seqs": st.integers(1, 4),
        "scheduler.max_num_batched_tokens": st.integers(4, budget_max),
    }
