"""Calibration: time a real runner over a grid of step mixes; the fit itself is in
`kvflow.engine_adapters.latency_fit` (re-exported here).

A mix is one step's shape: `num_prefills` prefill chunks sharing `num_prefill_tokens`,
each after `prefill_context` cached tokens, plus `num_decode_seqs` sequences decoding
one token each after `context_len` tokens of KV (or, with `decode_ramp`, after
contexts spread evenly up to `context_len`, as in a real batch). `measure` builds each
mix's `StepPlan` directly (block tables over a scratch cache; the KV contents do not
matter for timing), runs it `repeat` times after a warm-up and keeps a statistic of
the runs; the spread between the two halves of the runs is the machine's noise.

A shared machine's speed drifts while the grid is timed (another process takes a core
for seconds, then leaves): every step timed in such a spell is slow by the same factor,
whatever its mix. `measure` estimates that factor for each timed run from the runs of
other mixes timed just before and after it (each against its own mix's typical time),
and divides it out before reducing, so a slow spell neither skews the mixes it fell on
nor passes for the model's error. The factors are normalised to their median: the
timings describe the machine at its typical speed over the calibration.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.latency_fit import (
    LINEAR_TERMS,
    RUNNER_TERMS,
    Sample,
    fit,
    median_rel_error,
    predict_s,
    preset_fields,
    read_preset,
    relative_errors,
    residuals_by_shape,
    term_shares,
    write_preset,
)
from kvflow.engine_adapters.simulated import StepFeatures
from kvflow.request import Request, RequestState
from kvflow.scheduler.plan import StepPlan


class Mix(NamedTuple):
    """One step's shape (see the module docstring)."""

    num_prefill_tokens: int
    num_decode_seqs: int
    context_len: int
    prefill_context: int = 0
    num_prefills: int = 1
    decode_ramp: bool = False

    def chunks(self) -> list[int]:
        """The prefill chunks' lengths (the first takes the remainder)."""
        if not self.num_prefill_tokens:
            return []
        k = self.num_prefills
        base = self.num_prefill_tokens // k
        return [base + self.num_prefill_tokens - base * k] + [base] * (k - 1)

    def decode_contexts(self) -> list[int]:
        d, c = self.num_decode_seqs, self.context_len
        if self.decode_ramp:
            return [max(1, c * (i + 1) // d) for i in range(d)]
        return [c] * d


@dataclass(frozen=True, slots=True)
class Grid:
    """Mixes to time: every combination of the first three axes (a mix without decode
    sequences is taken once, whatever the context); then each prefill size after each
    of `prefill_contexts` cached tokens (alone, and beside a middle decode batch), split
    into each of `chunk_counts` chunks, and beside ramped decode batches."""

    prefill_tokens: tuple[int, ...] = (0, 32, 128, 512)
    decode_seqs: tuple[int, ...] = (0, 1, 4, 16, 32)
    context_lens: tuple[int, ...] = (16, 128, 512)
    prefill_contexts: tuple[int, ...] = (256, 1024)
    chunk_counts: tuple[int, ...] = (4,)
    ramp: bool = True

    def mixes(self, max_positions: int | None = None) -> list[Mix]:
        """The grid's mixes, leaving out those longer than `max_positions`."""
        found: dict[Mix, None] = {}

        def add(mix: Mix) -> None:
            longest = max(
                mix.prefill_context + max(mix.chunks(), default=0),
                max(mix.decode_contexts(), default=0) + 1,
            )
            if max_positions is None or longest <= max_positions:
                found[mix] = None

        for p, d, c in itertools.product(self.prefill_tokens, self.decode_seqs, self.context_lens):
            if p + d:
                add(Mix(p, d, c if d else 0))
        prefills = [p for p in self.prefill_tokens if p > 1]
        mid_d = self.decode_seqs[len(self.decode_seqs) // 2]
        mid_c = self.context_lens[len(self.context_lens) // 2]
        for p, pc in itertools.product(prefills, self.prefill_contexts):
            add(Mix(p, 0, 0, prefill_context=pc))
            if mid_d:
                add(Mix(p, mid_d, mid_c, prefill_context=pc))
        for p, k in itertools.product(prefills, self.chunk_counts):
            if p // k > 1:
                add(Mix(p, 0, 0, num_prefills=k))
        if self.ramp:
            for d, c in itertools.product(self.decode_seqs, self.context_lens):
                if d > 1:
                    add(Mix(0, d, c, decode_ramp=True))
                    if prefills:
                        add(Mix(prefills[len(prefills) // 2], d, c, decode_ramp=True))
        return list(found)


TRAIN_GRID = Grid()
HOLDOUT_GRID = Grid(
    prefill_tokens=(0, 16, 64, 256),
    decode_seqs=(0, 2, 8, 24),
    context_lens=(64, 256),
    prefill_contexts=(512,),
    chunk_counts=(2, 3),
)
"""Off the training grid on every axis: the mixes the fit error is reported on."""


def plan_for(
    mix: Mix, block_size: int, num_blocks: int, vocab_size: int, seed: int = 0
) -> StepPlan:
    """A plan of `mix` over block ids wrapping within `num_blocks` (use
    `blocks_needed` to size the cache so they do not wrap)."""
    rng = random.Random(seed)
    next_block = itertools.count()
    requests: list[RequestState] = []
    num_tokens: list[int] = []
    starts: list[int] = []

    def add(length: int, start: int) -> None:
        ids = tuple(rng.randrange(vocab_size) for _ in range(length))
        state = RequestState(Request(f"cal-{len(requests)}", ids, 1))
        state.block_ids = [
            next(next_block) % num_blocks for _ in range(math.ceil(length / block_size))
        ]
        requests.append(state)
        num_tokens.append(length - start)
        starts.append(start)

    for chunk in mix.chunks():
        add(mix.prefill_context + chunk, mix.prefill_context)
    for context in mix.decode_contexts():
        add(context + 1, context)
    return StepPlan(
        step_id=0,
        now=0.0,
        requests=requests,
        num_tokens=num_tokens,
        start_positions=starts,
        num_prefill_tokens=sum(n for n in num_tokens if n > 1),
        num_decode_tokens=sum(1 for n in num_tokens if n == 1),
        num_kv_tokens=sum(s + n for s, n in zip(starts, num_tokens, strict=True)),
    )


def blocks_needed(mixes: Iterable[Mix], block_size: int) -> int:
    """Blocks for the largest mix's plan without sharing any block."""
    return max(
        (
            sum(math.ceil((m.prefill_context + c) / block_size) for c in m.chunks())
            + sum(math.ceil((c + 1) / block_size) for c in m.decode_contexts())
            for m in mixes
        ),
        default=1,
    )


Statistic = Literal["median", "mean", "min"]
STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "mean": statistics.fmean,
    "min": min,
}


class Measured(NamedTuple):
    """`measure`'s result: one sample per mix, and per mix the relative difference
    between the statistic of the first and of the second half of the runs (the
    machine's run-to-run noise for that mix, after the drift is divided out; 0 with a
    single run); the machine's speed factor at each timed run, in the order they ran
    (time taken / typical time; all 1.0 without drift correction); and the noise
    before the drift was divided out."""

    samples: list[Sample]
    spreads: list[float]
    drift: list[float]
    raw_spreads: list[float]


DRIFT_NEIGHBOURS = 5
"""Timed runs on each side of a run whose mixes tell the machine's speed at that run:
the machine's slow spells last seconds, ten runs a fraction of one."""

DRIFT_ROUNDS = 6
"""Alternations of the drift estimate and the mixes' typical times (they settle in 3-4)."""


def measure(
    runner: ModelRunner,
    mixes: Sequence[Mix],
    *,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    repeat: int = 5,
    statistic: Statistic = "median",
    warm: bool = True,
    seed: int = 0,
    drift_neighbours: int = DRIFT_NEIGHBOURS,
) -> Measured:
    """Time `runner.execute` on each mix: one warm-up run of every mix, then `repeat`
    rounds over all mixes in a fresh random order each, keeping each mix's `statistic`
    of the runner's reported durations. Interleaving spreads slow spells of a shared
    machine over every mix instead of skewing a few. The median (or mean) describes the
    machine as it is, load included; the minimum, an idle one. With `warm`, each timed
    run follows an untimed run of the same mix: in a live engine a step mostly follows
    steps of like shape, whose data is still in the CPU's caches, while after another
    mix (a long prefill) a short step pays for refilling them. With `drift_neighbours`
    > 0 and more than one round, the machine's drift is divided out (module docstring;
    `drift_speeds`).

    Raises:
        ValueError: `repeat` < 1, `drift_neighbours` < 0 or an unknown statistic.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat!r}")
    if drift_neighbours < 0:
        raise ValueError(f"drift_neighbours must be >= 0, got {drift_neighbours!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    reduce = STATISTICS[statistic]
    plans = [plan_for(m, block_size, num_blocks, vocab_size, seed=i) for i, m in enumerate(mixes)]
    for plan in plans:
        runner.execute(plan)  # warm-up: allocator, kernels, caches
    timed: list[tuple[int, float]] = []
    """(mix, duration) of every timed run, in the order they ran."""
    order = list(range(len(plans)))
    rng = random.Random(seed)
    for _ in range(repeat):
        rng.shuffle(order)
        for i in order:
            if warm:
                runner.execute(plans[i])
            timed.append((i, runner.execute(plans[i]).duration_s))
    raw = _by_mix(len(plans), timed)
    drift = [1.0] * len(timed)
    if drift_neighbours and repeat > 1:
        drift = drift_speeds(timed, drift_neighbours)
    durations = _by_mix(len(plans), [(i, d / f) for (i, d), f in zip(timed, drift, strict=True)])
    samples = [Sample(StepFeatures.of(p), reduce(d)) for p, d in zip(plans, durations, strict=True)]
    return Measured(samples, _spreads(durations, reduce), drift, _spreads(raw, reduce))


PROBE_QUANTILES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
"""Where, among the training mixes ranked by their calibrated time, `SpeedProbe.of`
picks its mixes: short and middling steps of several shapes, none of the longest."""


class SpeedProbe:
    """The machine's speed now against the grid's timing: a few calibrated mixes timed
    again, `rounds` times each (each timed run after an untimed run of the same mix, as
    `measure` does), against the times the grid's timing kept for them; the median of
    measured / calibrated. 1.0: the machine runs as it typically did while the grid was
    timed; 1.3: 30% slower. A probe costs 2 x `rounds` runs of each mix (a few tenths of
    a second on a small model, ~10 s on one of 30 layers); one timed run of each of four
    mixes missed a run's own speed by up to 15% on this project's VM."""

    def __init__(
        self,
        runner: ModelRunner,
        plans: Sequence[StepPlan],
        reference_s: Sequence[float],
        rounds: int = 2,
    ):
        if not plans or len(plans) != len(reference_s) or min(reference_s) <= 0:
            raise ValueError("a speed probe needs plans, each with a positive reference time")
        if rounds < 1:
            raise ValueError(f"a speed probe needs rounds >= 1, got {rounds!r}")
        self.runner = runner
        self.plans = list(plans)
        self.reference_s = list(reference_s)
        self.rounds = rounds

    @classmethod
    def of(
        cls,
        runner: ModelRunner,
        mixes: Sequence[Mix],
        samples: Sequence[Sample],
        *,
        block_size: int,
        num_blocks: int,
        vocab_size: int,
        quantiles: Sequence[float] = PROBE_QUANTILES,
    ) -> SpeedProbe:
        """A probe of the mixes at `quantiles` of `samples`' durations (`samples[i]` is
        `mixes[i]`'s as `measure` kept it, whose plan it rebuilds with the same seed)."""
        ranked = sorted(range(len(samples)), key=lambda i: samples[i].duration_s)
        picked = sorted({ranked[min(len(ranked) - 1, int(q * len(ranked)))] for q in quantiles})
        plans = [plan_for(mixes[i], block_size, num_blocks, vocab_size, seed=i) for i in picked]
        return cls(runner, plans, [samples[i].duration_s for i in picked])

    def __call__(self) -> float:
        ratios = []
        for _ in range(self.rounds):
            for plan, reference in zip(self.plans, self.reference_s, strict=True):
                self.runner.execute(plan)
                ratios.append(self.runner.execute(plan).duration_s / reference)
        return statistics.median(ratios)


def _by_mix(num_mixes: int, timed: Sequence[tuple[int, float]]) -> list[list[float]]:
    """Each mix's durations, in the order they ran."""
    out: list[list[float]] = [[] for _ in range(num_mixes)]
    for i, d in timed:
        out[i].append(d)
    return out


def _spreads(
    durations: Sequence[Sequence[float]], reduce: Callable[[Sequence[float]], float]
) -> list[float]:
    """Per mix, the relative difference between its first and second half's statistic."""
    out = []
    for d in durations:
        half = len(d) // 2
        out.append(abs(reduce(d[:half]) - reduce(d[half:])) / reduce(d) if half else 0.0)
    return out


def drift_speeds(
    timed: Sequence[tuple[int, float]], neighbours: int = DRIFT_NEIGHBOURS
) -> list[float]:
    """The machine's speed factor at each of `timed`'s runs ((mix, duration) in the order
    they ran; each mix timed several times, spread over the whole timing): the median,
    over the `neighbours` runs on each side (not the run itself), of each run's duration
    against its mix's typical duration; the typical durations (each mix's median of its
    durations divided by their factors) and the factors are estimated in turn
    (`DRIFT_ROUNDS` times). Normalised to a median of 1."""
    if not timed:
        return []
    mixes = 1 + max(i for i, _ in timed)
    factors = [1.0] * len(timed)
    n = len(timed)
    for _ in range(DRIFT_ROUNDS):
        typical = [
            statistics.median(d) if d else 1.0
            for d in _by_mix(mixes, [(i, d / f) for (i, d), f in zip(timed, factors, strict=True)])
        ]
        ratios = [d / typical[i] for i, d in timed]
        factors = [
            statistics.median(
                [*ratios[max(0, k - neighbours) : k], *ratios[k + 1 : k + neighbours + 1]] or [1.0]
            )
            for k in range(n)
        ]
        middle = statistics.median(factors)
        factors = [f / middle for f in factors]
    return factors


__all__ = [
    "DRIFT_NEIGHBOURS",
    "HOLDOUT_GRID",
    "LINEAR_TERMS",
    "PROBE_QUANTILES",
    "RUNNER_TERMS",
    "STATISTICS",
    "TRAIN_GRID",
    "Grid",
    "Measured",
    "Mix",
    "Sample",
    "SpeedProbe",
    "Statistic",
    "blocks_needed",
    "drift_speeds",
    "fit",
    "measure",
    "median_rel_error",
    "plan_for",
    "predict_s",
    "preset_fields",
    "read_preset",
    "relative_errors",
    "residuals_by_shape",
    "term_shares",
    "write_preset",
]
