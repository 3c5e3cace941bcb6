"""The planner's search: the smallest fleet size meeting an attainment target at one
load, colocated or split into prefill and decode instances, and the answers priced.

For each load the search goes first upward 1, 2, 4, ... until a fleet meets the target
(or `max_instances` fails), then bisects between the last failing and the first meeting
size. Each round evaluates up to `jobs` fleets in parallel processes (a k-ary
bisection; plain bisection with one job).

Disaggregated (`pd=True`), the same search runs over the total T = P + D, from 2: a
total is evaluated by replaying every split P:D of it (P = 1..T-1), and it meets the
target when its best split does (the highest attainment, then goodput). A round takes
as many totals as their splits fit in `jobs` (at least one total), so the answer's total
and the one below it are always replayed split by split: the chosen split meets the
target and no split of T - 1 does.

Bisection assumes attainment does not fall as instances are added (more instances,
less queueing; split, the best split of T + 1 is at least as good as adding a prefill
or a decode instance to T's best). Routing makes that only nearly true, so the result
records whether the sizes it evaluated agree (`monotone`); the answer N itself is always
checked: N meets the target and N - 1 does not (both are replayed by the search).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvflow.cluster.plan import FleetCost, FleetEvaluation, fleet_cost
from kvflow.cluster.prices import GpuPrice


class Candidate(NamedTuple):
    """One fleet to replay: `num_instances` colocated, or split `pd` = (P, D)."""

    num_instances: int
    pd: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class SizePlan:
    """The search's answer at one load."""

    rate_scale: float
    target: float
    num_instances: int | None
    """The smallest size (total P + D when split) meeting the target; None: not even
    `max_instances`."""
    max_instances: int
    evaluations: tuple[FleetEvaluation, ...]
    """Every fleet evaluated, by size (then split)."""
    pd: bool = False
    """Disaggregated fleets: each size stands for its best split."""
    min_instances: int = 1
    """The smallest size searched (2 split; a fixed split's own size)."""
    fixed: bool = False
    """One split given (`--pd P:D`), replayed alone: no search."""

    def at(self, num_instances: int) -> FleetEvaluation | None:
        """The best fleet evaluated at this size: the highest attainment, then goodput
        (the first split in P order among equals)."""
        fleets = [e for e in self.evaluations if e.num_instances == num_instances]
        return max(fleets, key=lambda e: (e.attainment, e.goodput_rps), default=None)

    @property
    def meeting(self) -> FleetEvaluation | None:
        return None if self.num_instances is None else self.at(self.num_instances)

    @property
    def below(self) -> FleetEvaluation | None:
        """The evaluation that shows the answer is the smallest: the best at N - 1 (None
        when N is the smallest size searched), or at `max_instances` when no size met the
        target."""
        if self.num_instances is None:
            return self.at(self.max_instances)
        if self.num_instances <= self.min_instances:
            return None
        return self.at(self.num_instances - 1)

    @property
    def monotone(self) -> bool:
        """Every evaluated size below the answer fails and every one from it meets."""
        n = self.num_instances if self.num_instances is not None else self.max_instances + 1
        sizes = sorted({e.num_instances for e in self.evaluations})
        return all(
            ((best := self.at(size)) is not None and best.attainment >= self.target) == (size >= n)
            for size in sizes
        )


Evaluate = Callable[[Sequence[Candidate]], list[FleetEvaluation]]


def fleets_of(size: int, pd: bool) -> list[Candidate]:
    """The fleets one size stands for: itself colocated, or each split P:D of it."""
    if not pd:
        return [Candidate(size)]
    return [Candidate(size, (p, size - p)) for p in range(1, size)]


def search_size(
    evaluate: Evaluate,
    rate_scale: float,
    target: float,
    max_instances: int,
    jobs: int = 1,
    pd: bool = False,
    hint: int | None = None,
) -> SizePlan:
    """The smallest fleet size in 1..`max_instances` (2.. when `pd`) whose attainment
    (the best split's, when `pd`) is >= `target`.

    Args:
        evaluate: replays the given fleets (at this load) and returns their evaluations.
        jobs: fleets evaluated per round (every split of at least one size per round).
        pd: search disaggregated fleets: each size's every split P:D.
        hint: a size to start from (the colocated answer, for splits): the search
            replays it first, then gallops down (h-1, h-2, h-4, ...) when it meets the
            target, up (h+1, h+2, h+4, ...) when not. None: up from the smallest size,
            1, 2, 4, 8, ...
    """
    min_size = 2 if pd else 1
    if max_instances < min_size or jobs < 1:
        raise ValueError(
            f"max_instances must be >= {min_size} and jobs >= 1, got {max_instances}, {jobs}"
        )
    seen: dict[int, list[FleetEvaluation]] = {}

    def affordable(sizes: Sequence[int]) -> list[int]:
        """The leading sizes whose fleets fit in one round of `jobs` (at least one)."""
        taken: list[int] = []
        for size in sizes:
            if taken and sum(len(fleets_of(n, pd)) for n in [*taken, size]) > jobs:
                break
            taken.append(size)
        return taken

    def run(sizes: Sequence[int]) -> None:
        new = [n for n in sizes if n not in seen]
        for e in evaluate([c for n in new for c in fleets_of(n, pd)]):
            seen.setdefault(e.num_instances, []).append(e)

    def meets(n: int) -> bool:
        return max(e.attainment for e in seen[n]) >= target

    def rounds(ladder: list[int]) -> Iterator[list[int]]:
        start = 0
        while start < len(ladder):
            batch = affordable(ladder[start:])
            start += len(batch)
            run(batch)
            yield batch

    def climb(lo: int, ladder: list[int]) -> tuple[int, int | None]:
        """Up the ladder to the first size meeting the target: (the last failing, it)."""
        for batch in rounds(ladder):
            hi = next((n for n in batch if meets(n)), None)
            if hi is not None:
                return max([lo, *(n for n in batch if n < hi)]), hi
            lo = batch[-1]
        return lo, None

    def descend(hi: int, ladder: list[int]) -> tuple[int, int | None]:
        """Down the ladder to the first size failing: (it, the last meeting)."""
        for batch in rounds(ladder):
            for n in batch:
                if not meets(n):
                    return n, hi
                hi = n
        return min_size - 1, hi

    if hint is None or not min_size <= hint <= max_instances:
        lo, hi = climb(min_size - 1, _doubling(min_size, max_instances))
    else:
        run([hint])
        if meets(hint):
            lo, hi = descend(hint, _gallop(hint, min_size))
        else:
            lo, hi = climb(hint, _gallop(hint, max_instances))
    if hi is not None:
        for _ in range(max_instances):  # each round narrows (lo, hi) by at least one
            if hi - lo <= 1:
                break
            probes = _probes(lo, hi, jobs, lambda sizes: len(affordable(sizes)) == len(sizes))
            run(probes)
            meeting = [n for n in probes if meets(n)]
            if meeting:
                hi = meeting[0]
            lo = max([lo, *(n for n in probes if n < hi)])
    evaluations = tuple(e for n in sorted(seen) for e in seen[n])
    return SizePlan(rate_scale, target, hi, max_instances, evaluations, pd, min_size)


def _doubling(start: int, end: int) -> list[int]:
    """`start`, 2 `start`, 4 `start`, ... below `end`, then `end`."""
    sizes = []
    n = start
    while n < end:
        sizes.append(n)
        n *= 2
    return [*sizes, end]


def _gallop(start: int, end: int) -> list[int]:
    """`start` +- 1, 2, 4, ... towards `end`, then `end` (`start` itself left out)."""
    step = 1 if end > start else -1
    sizes = []
    offset = 1
    while (start + step * offset - end) * step < 0:
        sizes.append(start + step * offset)
        offset *= 2
    return sizes if start == end else [*sizes, end]


def _probes(lo: int, hi: int, jobs: int, fits: Callable[[list[int]], bool]) -> list[int]:
    """The most sizes (at most `jobs`), evenly spaced strictly between `lo` and `hi`,
    whose fleets fit in one round; at least one."""
    gap = hi - lo
    k = min(jobs, gap - 1)
    while True:
        probes = sorted({lo + (gap * (i + 1)) // (k + 1) for i in range(k)} - {lo, hi})
        if k <= 1 or fits(probes):
            return probes
        k -= 1


def evaluate_split(
    evaluate: Evaluate, rate_scale: float, target: float, pd: tuple[int, int]
) -> SizePlan:
    """One fixed split P:D replayed at this load, as a plan: its size when it meets the
    target, else None (and its evaluation is `below`)."""
    size = sum(pd)
    (e,) = evaluate([Candidate(size, pd)])
    met = size if e.attainment >= target else None
    return SizePlan(rate_scale, target, met, size, (e,), pd=True, min_instances=size, fixed=True)


class PricedPlan(NamedTuple):
    """A search's answer and the cost of the fleet it chose (None: none met the target)."""

    plan: SizePlan
    cost: FleetCost | None


def priced(gpu: GpuPrice, plan: SizePlan) -> PricedPlan:
    return PricedPlan(plan, None if plan.meeting is None else fleet_cost(gpu, plan.meeting))


class LoadPlan(NamedTuple):
    """Both answers at one load: the colocated fleet and, when asked, the split one."""

    colocated: PricedPlan
    split: PricedPlan | None = None

    def cheaper(self) -> str | None:
        """`colocated`, `pd` or `tie` by $ per million output tokens; None unless both
        answers met the target and served tokens."""
        if self.split is None or self.colocated.cost is None or self.split.cost is None:
            return None
        a = self.colocated.cost.dollars_per_million_output_tokens
        b = self.split.cost.dollars_per_million_output_tokens
        if a is None or b is None:
            return None
        return "tie" if a == b else "colocated" if a < b else "pd"
