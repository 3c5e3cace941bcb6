"""Workload shaping: change when requests arrive, or which of them are replayed.

Every function returns new `Request`s (they are immutable) sorted by arrival.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvflow.request import Request


def _sorted(requests: Sequence[Request]) -> list[Request]:
    return sorted(requests, key=lambda r: r.arrival_time)


def time_scale(requests: Sequence[Request], factor: float) -> list[Request]:
    """Multiply every arrival offset (from the first arrival) by `factor`: 0.5 replays
    the trace twice as fast. Deadlines move with their arrivals."""
    if not factor > 0:
        raise ValueError(f"time scale must be > 0, got {factor!r}")
    ordered = _sorted(requests)
    if not ordered:
        return []
    t0 = ordered[0].arrival_time
    out = []
    for r in ordered:
        arrival = t0 + (r.arrival_time - t0) * factor
        deadline = None if r.deadline is None else r.deadline + (arrival - r.arrival_time)
        out.append(dataclasses.replace(r, arrival_time=arrival, deadline=deadline))
    return out


def scale_to_rate(requests: Sequence[Request], rate_rps: float) -> list[Request]:
    """Rescale arrivals so the mean request rate over the trace is `rate_rps`."""
    if not rate_rps > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate_rps!r}")
    ordered = _sorted(requests)
    if len(ordered) < 2:
        return ordered
    span = ordered[-1].arrival_time - ordered[0].arrival_time
    if span <= 0:
        raise ValueError("every request arrives at the same time: no rate to scale")
    current = (len(ordered) - 1) / span
    return time_scale(ordered, current / rate_rps)


def limit(requests: Sequence[Request], num_requests: int) -> list[Request]:
    """The first `num_requests` requests by arrival."""
    if num_requests < 0:
        raise ValueError(f"limit must be >= 0, got {num_requests!r}")
    return _sorted(requests)[:num_requests]


def window(requests: Sequence[Request], start_s: float, end_s: float) -> list[Request]:
    """Requests arriving in [start_s, end_s) seconds after the first arrival, shifted so
    the window starts at 0."""
    if not end_s > start_s:
        raise ValueError(f"window end must be after its start, got {start_s!r}:{end_s!r}")
    ordered = _sorted(requests)
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
