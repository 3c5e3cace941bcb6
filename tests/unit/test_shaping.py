"""Workload shaping: time scale, rate, limit, window, and their order."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvflow.request import SLO, Request
from kvflow.traces.shaping import (
    limit,
    mean_rate,
    parse_window,
    scale_to_rate,
    shape,
    time_scale,
    window,
)

ARRIVALS = [10.0, 10.5, 11.0, 13.0, 20.0]


def make(arrivals: list[float] = ARRIVALS, deadline_after: float | None = 0.25) -> list[Request]:
    return [
        Request(
            f"q{i}",
            (1, 2, 3),
            2,
            arrival_time=t,
            slo=SLO(ttft_ms=100.0),
            deadline=None if deadline_after is None else t + deadline_after,
        )
        for i, t in enumerate(arrivals)
    ]


def arrivals(requests: list[Request]) -> list[float]:
    return [r.arrival_time for r in requests]


def test_time_scale_stretches_offsets_from_the_first_arrival() -> None:
    out = time_scale(list(reversed(make())), 0.5)
    assert arrivals(out) == [10.0, 10.25, 10.5, 11.5, 15.0]
    assert all(r.deadline == pytest.approx(r.arrival_time + 0.25) for r in out)
    assert [r.request_id for r in out] == ["q0", "q1", "q2", "q3", "q4"]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="time scale"):
            time_scale(make(), bad)


def test_scale_to_rate_hits_the_mean_rate_and_keeps_proportions() -> None:
    assert mean_rate(make()) == pytest.approx(4 / 10)
    out = scale_to_rate(make(), 2.0)
    assert mean_rate(out) == pytest.approx(2.0)
    gaps = [b - a for a, b in zip(arrivals(out), arrivals(out)[1:], strict=False)]
    assert gaps == pytest.approx([0.1, 0.1, 0.4, 1.4])
    with pytest.raises(ValueError, match="same time"):
        scale_to_rate(make([1.0, 1.0, 1.0]), 2.0)
    assert scale_to_rate(make([3.0]), 2.0) == make([3.0])
    assert mean_rate(make([1.0])) is None


def test_limit_takes_the_first_by_arrival() -> None:
    requests = make()
    assert limit(list(reversed(requests)), 2) == requests[:2]
    assert limit(requests, 0) == [] and limit(requests, 99) == requests
    with pytest.raises(ValueError):
        limit(requests, -1)


def test_window_selects_by_offset_and_shifts_to_zero() -> None:
    out = window(make(), 0.5, 3.5)
    assert [r.request_id for r in out] == ["q1", "q2", "q3"]
    assert arrivals(out) == [0.0, 0.5, 2.5]
    assert [r.deadline for r in out] == [0.25, 0.75, 2.75]
    assert [r.request_id for r in window(make(), 3.0)] == ["q3", "q4"]
    with pytest.raises(ValueError, match="window"):
        window(make(), 3.0, 3.0)


def test_parse_window() -> None:
    assert parse_window("10:20") == (10.0, 20.0)
    assert parse_window(":60") == (0.0, 60.0)
    assert parse_window("300:") == (300.0, math.inf)
    for bad in ("10", "20:10", "a:b", "-1:5", "nan:1"):
        with pytest.raises(ValueError, match="bad window"):
            parse_window(bad)


def test_shape_applies_window_then_limit_then_rate() -> None:
    requests = make()
    out = shape(requests, window_s=(0.5, math.inf), num_requests=3, rate_rps=1.0)
    # window keeps q1..q4 (shifted), limit keeps q1..q3, whose 2.5 s span becomes 2 s.
    assert [r.request_id for r in out] == ["q1", "q2", "q3"]
    assert arrivals(out) == pytest.approx([0.0, 0.4, 2.0])
    assert shape(requests) == requests
    assert arrivals(shape(requests, scale=2.0)) == [10.0, 11.0, 12.0, 16.0, 30.0]
    with pytest.raises(ValueError, match="not both"):
        shape(requests, scale=2.0, rate_rps=1.0)


def outcome(step: Callable[[], list[Request]]) -> list[Request] | str:
    try:
        return step()
    except ValueError as err:
        return str(err)


@given(
    arrivals=st.lists(st.sampled_from([0.0, 0.5, 3.0, 3.0, 7.25]) | st.floats(0, 1e4), max_size=20),
    window_s=st.none()
    | st.tuples(st.sampled_from([0.0, 0.5, 2.0]), st.sampled_from([1.0, 9.0, math.inf])),
    num_requests=st.none() | st.integers(0, 25),
    scale=st.none() | st.sampled_from([0.25, 1.0, 3.0]),
    rate_rps=st.none() | st.sampled_from([0.5, 4.0]),
)
def test_shape_equals_its_steps_applied_one_by_one(
    arrivals: list[float],
    window_s: tuple[float, float] | None,
    num_requests: int | None,
    scale: float | None,
    rate_rps: float | None,
) -> None:
    # shape sorts once; each public step sorts its input again: the results must agree
    # (unsorted input, ties kept in input order, deadlines moved along).
    requests = make(arrivals)

    def one_by_one() -> list[Request]:
        out = sorted(requests, key=lambda r: r.arrival_time)
        if window_s is not None:
            out = window(out, *window_s)
        if num_requests is not None:
            out = limit(out, num_requests)
        if scale is not None:
            out = time_scale(out, scale)
        if rate_rps is not None:
            out = scale_to_rate(out, rate_rps)
        return out

    shaped = outcome(
        lambda: shape(
            requests, window_s=window_s, num_requests=num_requests, scale=scale, rate_rps=rate_rps
        )
    )
    if scale is not None and rate_rps is not None:
        assert shaped == "give a time scale or a target rate, not both"
    else:
        assert shaped == outcome(one_by_one)


def test_a_stretch_past_the_clock_resolution_is_refused_naming_the_option() -> None:
    # Arrivals ~10^300 s apart: a step of 5 ms added to them would round away.
    with pytest.raises(ValueError, match=r"time scale 1e\+300 .* resolution"):
        time_scale(make(), 1e300)
    with pytest.raises(ValueError, match=r"rate 1e-300 requests/s .* resolution"):
        scale_to_rate(make(), 1e-300)
    slow = scale_to_rate(make(), 1e-6)  # the 10 s become ~46 days: still fine
    assert arrivals(slow)[-1] < 1e9
