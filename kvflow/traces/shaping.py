"""Workload shaping: change when requests arrive, or which of them are replayed.

Every function returns new `Request`s (they are immutable) sorted by arrival; ties keep
their order. `shape` applies the command line's options in a fixed order: window, then
limit, then time scale or rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from kvflow.request import Request


def _sorted(requests: Sequence[Request]) -> list[Request]:
    """`requests` by arrival, ties in their order. Each public function sorts here and
    hands the list to its private twin (`_window`, `_limit`, `_time_scale`,
    `_scale_to_rate`), which takes it sorted and keeps it sorted (offsets only shift,
    or scale by a factor > 0), so `shape` sorts once for all its steps."""
    return sorted(requests, key=lambda r: r.arrival_time)


MAX_ARRIVAL_S = 1e9
"""Latest arrival a time scale or rate may produce (about 32 years): past it, a float
clock's steps are coarser than the microsecond latencies are recorded in, and a step of
a few milliseconds added to such a time can be lost to rounding entirely."""


def _check_stretch(ordered: list[Request], factor: float, what: str) -> None:
    """`factor` keeps the last arrival within `MAX_ARRIVAL_S`; `what` names the option."""
    t0, t1 = ordered[0].arrival_time, ordered[-1].arrival_time
    last = abs(t0) + (t1 - t0) * factor
    if not last <= MAX_ARRIVAL_S:
        raise ValueError(
            f"{what} stretches the trace's {t1 - t0:g} s of arrivals to {last:g} s; "
            f"virtual time past {MAX_ARRIVAL_S:g} s loses the microsecond resolution "
            "latencies are measured in"
        )


def _finite_positive(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def time_scale(requests: Sequence[Request], factor: float) -> list[Request]:
    """Multiply every arrival offset (from the first arrival) by `factor`: 0.5 replays
    the trace twice as fast. Deadlines move with their arrivals."""
    return _time_scale(_sorted(requests), factor)


def _time_scale(ordered: list[Request], factor: float) -> list[Request]:
    _finite_positive(factor, "time scale")
    if not ordered:
        return []
    _check_stretch(ordered, factor, f"time scale {factor:g}")
    t0 = ordered[0].arrival_time
    out = []
    for r in ordered:
        arrival = t0 + (r.arrival_time - t0) * factor
        deadline = None if r.deadline is None else r.deadline + (arrival - r.arrival_time)
        out.append(dataclasses.replace(r, arrival_time=arrival, deadline=deadline))
    return out


def mean_rate(requests: Sequence[Request]) -> float | None:
    """Requests per second over the trace: (n - 1) / (last arrival - first arrival);
    None for fewer than two requests or when all arrive at once."""
    if len(requests) < 2:
        return None
    arrivals = [r.arrival_time for r in requests]
    span = max(arrivals) - min(arrivals)
    return (len(requests) - 1) / span if span > 0 else None


def scale_to_rate(requests: Sequence[Request], rate_rps: float) -> list[Request]:
    """Rescale arrivals so the mean request rate over the trace is `rate_rps`, keeping
    the trace's burstiness (its gaps keep their proportions)."""
    return _scale_to_rate(_sorted(requests), rate_rps)


def _scale_to_rate(ordered: list[Request], rate_rps: float) -> list[Request]:
    _finite_positive(rate_rps, "rate (requests/s)")
    if len(ordered) < 2:
        return ordered
    current = mean_rate(ordered)
    if current is None:
        raise ValueError("every request arrives at the same time: no rate to scale")
    _check_stretch(ordered, current / rate_rps, f"rate {rate_rps:g} requests/s")
    return _time_scale(ordered, current / rate_rps)


def limit(requests: Sequence[Request], num_requests: int) -> list[Request]:
    """The first `num_requests` requests by arrival."""
    return _limit(_sorted(requests), num_requests)


def _limit(ordered: list[Request], num_requests: int) -> list[Request]:
    if num_requests < 0:
        raise ValueError(f"limit must be >= 0, got {num_requests!r}")
    return ordered[:num_requests]


def window(requests: Sequence[Request], start_s: float, end_s: float = math.inf) -> list[Request]:
    """Requests arriving in [start_s, end_s) seconds after the first arrival, shifted so
    the window starts at 0."""
    return _window(_sorted(requests), start_s, end_s)


def _window(ordered: list[Request], start_s: float, end_s: float) -> list[Request]:
    if math.isnan(start_s) or math.isnan(end_s) or not end_s > start_s or start_s < 0:
        raise ValueError(f"window needs 0 <= start < end, got {start_s!r}:{end_s!r}")
    if not ordered:
        return []
    t0 = ordered[0].arrival_time
    out = []
    for r in ordered:
        offset = r.arrival_time - t0
        if start_s <= offset < end_s:
            shift = t0 + start_s
            deadline = None if r.deadline is None else r.deadline - shift
            out.append(dataclasses.replace(r, arrival_time=offset - start_s, deadline=deadline))
    return out


def parse_window(text: str) -> tuple[float, float]:
    """``START:END`` in seconds as (start, end); either side may be empty (``:60``,
    ``300:``) for the trace's start or end.

    Raises:
        ValueError: quoting the text.
    """
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep:
            raise ValueError("no ':'")
        start = float(start_text) if start_text.strip() else 0.0
        end = float(end_text) if end_text.strip() else math.inf
        if not (math.isfinite(start) and 0 <= start < end):
            raise ValueError("need 0 <= START < END")
    except ValueError as err:
        raise ValueError(f"bad window {text!r} ({err}); expected START:END in seconds") from None
    return start, end


def shape(
    requests: Sequence[Request],
    *,
    window_s: tuple[float, float] | None = None,
    num_requests: int | None = None,
    scale: float | None = None,
    rate_rps: float | None = None,
) -> list[Request]:
    """Apply the shaping options in order: `window_s` (start, end) in the trace's own
    time, then the first `num_requests`, then the time `scale` factor or the target mean
    `rate_rps` (not both). Options left None do nothing.

    Raises:
        ValueError: a bad option, or both `scale` and `rate_rps`.
    """
    if scale is not None and rate_rps is not None:
        raise ValueError("give a time scale or a target rate, not both")
    out = _sorted(requests)
    if window_s is not None:
        out = _window(out, *window_s)
    if num_requests is not None:
        out = _limit(out, num_requests)
    if scale is not None:
        out = _time_scale(out, scale)
    if rate_rps is not None:
        out = _scale_to_rate(out, rate_rps)
    return out
