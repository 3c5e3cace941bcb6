"""Calibration: time a real runner over a grid of step mixes and fit the simulator's
`LatencyModel` to the measurements.

A mix is one step's shape: a prefill chunk of `num_prefill_tokens` (from position 0),
plus `num_decode_seqs` sequences decoding one token each after `context_len` tokens of
KV. `measure` builds each mix's `StepPlan` directly (block tables over a scratch cache;
the KV contents do not matter for timing), runs it `repeat` times after a warm-up and
keeps the median. `fit` solves for the four coefficients by least squares on relative
error (each sample weighted by 1/measured, so short and long steps count alike), with
every coefficient >= 0: the best of all 16 subsets of free coefficients, each solved
exactly, which for four unknowns is the non-negative optimum.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kvflow.config import ConfigError
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import LatencyModel
from kvflow.request import Request, RequestState
from kvflow.scheduler.plan import StepPlan


class Mix(NamedTuple):
    """One step's shape (see the module docstring)."""

    num_prefill_tokens: int
    num_decode_seqs: int
    context_len: int


class Sample(NamedTuple):
    """A step's counts, as `StepPlan` reports them, and its measured duration."""

    num_prefill_tokens: int
    num_decode_seqs: int
    num_kv_tokens: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Grid:
    """Mixes to time: every combination of the three axes (a mix without decode
    sequences is taken once, whatever the context)."""

    prefill_tokens: tuple[int, ...] = (0, 32, 128, 512)
    decode_seqs: tuple[int, ...] = (0, 1, 4, 16, 32)
    context_lens: tuple[int, ...] = (16, 128, 512)

    def mixes(self, max_positions: int | None = None) -> list[Mix]:
        """The grid's mixes, leaving out those longer than `max_positions`."""
        found: dict[Mix, None] = {}
        for p, d, c in itertools.product(self.prefill_tokens, self.decode_seqs, self.context_lens):
            mix = Mix(p, d, c if d else 0)
            if p + d == 0 or (max_positions is not None and max(p, c + 1) > max_positions):
                continue
            found[mix] = None
        return list(found)


TRAIN_GRID = Grid()
HOLDOUT_GRID = Grid(
    prefill_tokens=(0, 16, 64, 256), decode_seqs=(0, 2, 8, 24), context_lens=(64, 256)
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

    if mix.num_prefill_tokens:
        add(mix.num_prefill_tokens, 0)
    for _ in range(mix.num_decode_seqs):
        add(mix.context_len + 1, mix.context_len)
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
            math.ceil(m.num_prefill_tokens / block_size)
            + m.num_decode_seqs * math.ceil((m.context_len + 1) / block_size)
            for m in mixes
        ),
        default=1,
    )


def measure(
    runner: ModelRunner,
    mixes: Sequence[Mix],
    *,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    repeat: int = 5,
    statistic: Literal["median", "min"] = "median",
    seed: int = 0,
) -> list[Sample]:
    """Time `runner.execute` on each mix: one warm-up run of every mix, then `repeat`
    rounds over all mixes in a fresh random order each, keeping each mix's median (or
    minimum) of the runner's reported durations. Interleaving spreads slow spells of a
    shared machine over every mix instead of skewing a few; the minimum discards them,
    estimating the step time of an otherwise idle machine.

    Raises:
        ValueError: `repeat` < 1.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat!r}")
    plans = [plan_for(m, block_size, num_blocks, vocab_size, seed=i) for i, m in enumerate(mixes)]
    for plan in plans:
        runner.execute(plan)  # warm-up: allocator, kernels, caches
    durations: list[list[float]] = [[] for _ in plans]
    order = list(range(len(plans)))
    rng = random.Random(seed)
    for _ in range(repeat):
        rng.shuffle(order)
        for i in order:
            durations[i].append(runner.execute(plans[i]).duration_s)
    reduce = min if statistic == "min" else statistics.median
    return [
        Sample(p.num_prefill_tokens, p.num_decode_tokens, p.num_kv_tokens, reduce(d))
        for p, d in zip(plans, durations, strict=True)
    ]


# Units of the columns: ms per unit of each count, so the solution is in the model's units.
_SCALES = (1.0, 1e-3, 1e-3, 1e-6)


def _row(s: Sample) -> tuple[float, float, float, float]:
    return (1.0, float(s.num_prefill_tokens), float(s.num_decode_seqs), float(s.num_kv_tokens))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(rhs)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                for k in range(col, n + 1):
                    a[r][k] -= factor * a[col][k]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit(samples: Sequence[Sample]) -> LatencyModel:
    """The non-negative `LatencyModel` minimising the squared relative error of its
    step times over `samples`.

    Raises:
        ValueError: no samples, or a sample with a non-positive duration.
    """
    if not samples:
        raise ValueError("fit needs at least one sample")
    bad = [s for s in samples if not s.duration_s > 0]
    if bad:
        raise ValueError(f"samples need positive durations, got {bad[0]!r}")
    # Rows divided by the measured time (relative error); columns scaled to unit size
    # so the normal equations stay well conditioned.
    rows = [[v * u / (s.duration_s * 1e3) for v, u in zip(_row(s), _SCALES, strict=True)]
            for s in samples]  # fmt: skip
    norms = [max(abs(r[j]) for r in rows) or 1.0 for j in range(4)]
    rows = [[r[j] / norms[j] for j in range(4)] for r in rows]
    best: tuple[float, list[float]] | None = None
    for size in range(1, 5):
        for free in itertools.combinations(range(4), size):
            gram = [[sum(r[i] * r[j] for r in rows) for j in free] for i in free]
            rhs = [sum(r[i] for r in rows) for i in free]
            solution = _solve(gram, rhs)
            if solution is None or any(x < 0 for x in solution):
                continue
            coef = [0.0] * 4
            for j, x in zip(free, solution, strict=True):
                coef[j] = x
            loss = sum((sum(r[j] * coef[j] for j in range(4)) - 1.0) ** 2 for r in rows)
            if best is None or loss < best[0] - 1e-15:
                best = (loss, coef)
    if best is None:  # every subset singular: all counts zero; a fixed cost fits
        return LatencyModel(statistics.fmean(s.duration_s for s in samples) * 1e3, 0, 0, 0)
    c = [best[1][j] / norms[j] for j in range(4)]
    return LatencyModel(fixed_ms=c[0], prefill_token_us=c[1], decode_seq_us=c[2], kv_token_ns=c[3])


def predict_s(model: LatencyModel, sample: Sample) -> float:
    """The model's step time for the sample's counts."""
    return model.step_time_s(
        sample.num_prefill_tokens, sample.num_decode_seqs, sample.num_kv_tokens
    )


def relative_errors(model: LatencyModel, samples: Sequence[Sample]) -> list[float]:
    """|predicted - measured| / measured per sample."""
    return [abs(predict_s(model, s) - s.duration_s) / s.duration_s for s in samples]


def median_rel_error(model: LatencyModel, samples: Sequence[Sample]) -> float:
    """The median of `relative_errors` (nan for no samples)."""
    errors = relative_errors(model, samples)
    return statistics.median(errors) if errors else math.nan


# -- preset files ----------------------------------------------------------------------
_COEFFICIENTS = ("fixed_ms", "prefill_token_us", "decode_seq_us", "kv_token_ns")


def preset_fields(model: LatencyModel) -> dict[str, float]:
    """The model's four coefficients by name, as a preset file holds them."""
    return {name: float(getattr(model, name)) for name in _COEFFICIENTS}


def write_preset(path: str | Path, latency: LatencyModel, **info: Any) -> dict[str, Any]:
    """Write the model's coefficients and `info` (fit figures, model, device) as JSON;
    returns the document."""
    doc: dict[str, Any] = {**preset_fields(latency), **info}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def read_preset(path: str | Path) -> LatencyModel:
    """A latency model from a preset file written by `write_preset` (`kvflow calibrate`).

    Raises:
        ConfigError: an unreadable file or one without the four coefficients.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"sim.preset_file={str(path)!r}: cannot read it: {err}") from None
    values: dict[str, float] = {}
    for name in _COEFFICIENTS:
        value = doc.get(name) if isinstance(doc, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(
                f"sim.preset_file={str(path)!r}: {name} must be a number >= 0, got {value!r}"
            )
        values[name] = float(value)
    return LatencyModel(**values)


__all__ = [
    "HOLDOUT_GRID",
    "TRAIN_GRID",
    "Grid",
    "Mix",
    "Sample",
    "blocks_needed",
    "fit",
    "measure",
    "median_rel_error",
    "plan_for",
    "predict_s",
    "preset_fields",
    "read_preset",
    "relative_errors",
    "write_preset",
]
