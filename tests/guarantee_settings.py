"""Hypothesis settings profiles of the guarantee tests (model-based tests and fuzzing).

Each guarantee test runs twice over: a default run sized for CI (a few seconds each,
thousands of examples in all), and a run marked `slow` (deselected by default; run it
with `python -m pytest -m slow`) with ten times the examples, that a developer runs
before submitting a change to the core. `examples(n)` is a test's default-run settings;
`examples(n, slow=True)` its slow run's.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

SLOW_FACTOR = 10
"""The slow profile runs this many times the default run's examples."""

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
    """Settings for `n` examples in the default run (`SLOW_FACTOR * n` when `slow`)."""
    parent = settings.get_profile("guarantees-slow" if slow else "guarantees")
    num = SLOW_FACTOR * n if slow else n
    return settings(parent, max_examples=num, **overrides)  # type: ignore[arg-type]
