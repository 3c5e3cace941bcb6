"""What the fuzz tests share: hostile JSON values, a guard against hangs, a bound on the
memory a run of cases may take, and the run itself (`fuzz`)."""

from __future__ import annotations

import json
import resource
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.guarantee_settings import examples, scaled

ODD_INTS = [0, -1, 1, 2**24, 2**24 + 1, 2**31, 2**32, 2**63, -(2**63), 10**18, 10**400]
ODD_FLOATS = [0.0, -0.0, 0.5, -1.5, 1e308, -1e308, 1e-320, float("nan"), float("inf")]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-10, 5000)
    | st.sampled_from(ODD_INTS)
    | st.sampled_from(ODD_FLOATS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
"""JSON values of every type, with the integers and floats that break parsers."""


def deeply_nested(depth: int = 100_000) -> str:
    """JSON text nested far past Python's recursion limit."""
    return "[" * depth + "]" * depth


def dumps(value: Any) -> str:
    """JSON text, NaN and Infinity included (as Python's json writes and reads them)."""
    return json.dumps(value, allow_nan=True)


class Hang(Exception):
    """A case ran past its time limit."""


@contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Raise `Hang` in this (main) thread if the block runs longer than `seconds`."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reset_peak_rss() -> int:
    """Start this process's peak resident memory afresh, so that `peak_rss_bytes()` then
    measures from now and a bound on its growth holds whatever ran before in this
    process (a peak of an earlier test would hide any growth below it). Returns the peak
    now. Linux (`/proc/self/clear_refs`); elsewhere the peak is left as it is."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (since `reset_peak_rss`, where it can)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MAX_RSS_GROWTH = 256 * 2**20
"""How much a fuzz run's peak resident memory may grow over all its cases."""


def fuzz(
    label: str,
    num_cases: int,
    slow: bool,
    check: Callable[..., bool],
    **strategies: st.SearchStrategy[Any],
) -> None:
    """Run `check` on `scaled(num_cases, slow)` cases drawn from `strategies` (its keyword
    arguments): each says whether its input loaded (True) or was refused as documented
    (False). Both must happen (or the cases are too far off, or too tame), and the
    peak memory must grow less than `MAX_RSS_GROWTH` over the run."""
    before = reset_peak_rss()
    outcomes: list[bool] = []

    @examples(scaled(num_cases, slow), slow=slow)
    @given(**strategies)
    def case(**drawn: Any) -> None:
        outcomes.append(check(**drawn))

    case()
    assert len(outcomes) >= scaled(num_cases, slow)
    assert set(outcomes) == {True, False}, "the cases never load, or never fail: too far off"
    print(f"{label}: {len(outcomes)} cases")
    growth = peak_rss_bytes() - before
    assert growth < MAX_RSS_GROWTH, f"peak memory grew {growth} B over {len(outcomes)} cases"
