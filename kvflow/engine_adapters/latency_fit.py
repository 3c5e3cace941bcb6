"""Fitting the simulator's `LatencyModel` to measured steps, judging the fit, and the
preset files that carry it.

`fit` solves non-negative least squares (`scipy.optimize.nnls`) on *relative* error:
each sample's row of features is divided by its measured time, so a 2 ms step and a
2 s step count alike, and every coefficient is >= 0 (a step never gets faster by
doing more). Columns are scaled to unit size first so the solver is well conditioned.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kvflow.config import ConfigError, read_small_file
from kvflow.engine_adapters.simulated import ENGINE_TERMS, TERMS, LatencyModel, StepFeatures

RUNNER_TERMS: tuple[str, ...] = tuple(t for t in TERMS if t not in ENGINE_TERMS)
"""The coefficients a runner's measured steps determine (the engine's are measured
around them, see `kvflow.engine_adapters.engine_timing`)."""
LINEAR_TERMS = ("fixed_ms", "prefill_token_us", "decode_seq_us", "kv_token_ns")
"""The original four-coefficient model."""


class Sample(NamedTuple):
    """A step's features and its measured duration (a statistic over repeats)."""

    features: StepFeatures
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        return {**self.features._asdict(), "duration_s": self.duration_s}


_UNIT = LatencyModel(**dict.fromkeys(TERMS, 1.0))


def _unit_columns(features: StepFeatures, terms: Sequence[str]) -> list[float]:
    """Seconds each term in `terms` takes for `features` at a coefficient of 1 (in the
    term's own unit: ms, us or ns)."""
    seconds = _UNIT.terms_s(features)
    return [seconds[TERMS.index(t)] for t in terms]


def fit(
    samples: Sequence[Sample],
    terms: Sequence[str] = RUNNER_TERMS,
    weights: Sequence[float] | None = None,
) -> LatencyModel:
    """The non-negative `LatencyModel` over `terms` (the others 0) minimising the
    squared relative error of its step times over `samples`, each squared error
    multiplied by its sample's weight (1 each when `weights` is None).

    Raises:
        ValueError: no samples, a non-positive duration, an unknown term, or weights
            that are not one non-negative number per sample.
    """
    from scipy.optimize import nnls

    if not samples:
        raise ValueError("fit needs at least one sample")
    bad = [s for s in samples if not s.duration_s > 0]
    if bad:
        raise ValueError(f"samples need positive durations, got {bad[0]!r}")
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"unknown latency terms {unknown!r}; known: {', '.join(TERMS)}")
    if weights is None:
        root = np.ones(len(samples))
    else:
        if len(weights) != len(samples) or not all(w >= 0 for w in weights):
            raise ValueError(
                f"weights must be one number >= 0 per sample ({len(samples)}), got "
                f"{len(weights)} with minimum {min(weights, default=None)!r}"
            )
        root = np.sqrt(np.asarray(weights, dtype=np.float64))
    matrix = (
        np.array(
            [[v / s.duration_s for v in _unit_columns(s.features, terms)] for s in samples],
            dtype=np.float64,
        )
        * root[:, None]
    )
    norms = np.abs(matrix).max(axis=0)
    norms[norms == 0] = 1.0
    solution, _ = nnls(matrix / norms, root, maxiter=50 * len(terms))
    coef = solution / norms
    fitted = {term: float(value) for term, value in zip(terms, coef, strict=True)}
    return LatencyModel(**{**dict.fromkeys(TERMS, 0.0), **fitted})


GRID_WEIGHT = 0.1
"""In `fit_live`, the grid's share of the total weight beside the engine's steps."""


def fit_live(
    live: Sequence[Sample], grid: Sequence[Sample], grid_weight: float = GRID_WEIGHT
) -> LatencyModel:
    """The runner's terms fitted on the steps a live engine ran (`live`: features and
    the runner's duration inside the engine), with the calibration grid (`grid`)
    weighing `grid_weight` of the total beside them.

    The grid varies one thing at a time, so it tells the terms apart; the live steps
    are what the model has to predict: their mixes, their shared prefixes (a decode
    batch whose sequences read the same system-prompt blocks finds them in the CPU's
    caches, which no grid mix of private blocks shows), the machine's speed at the
    time. One scale for all terms cannot follow a miss that differs by kind of step;
    this refit can, and the grid keeps the terms it leaves undetermined where the grid
    put them.

    Raises:
        ValueError: no live steps, no grid samples or `grid_weight` outside [0, 1).
    """
    if not live or not grid:
        raise ValueError(f"fit_live needs live and grid samples, got {len(live)}, {len(grid)}")
    if not 0 <= grid_weight < 1:
        raise ValueError(f"grid_weight must be in [0, 1), got {grid_weight!r}")
    per_grid = grid_weight / (1 - grid_weight) * len(live) / len(grid)
    return fit([*live, *grid], weights=[1.0] * len(live) + [per_grid] * len(grid))


def predict_s(model: LatencyModel, sample: Sample) -> float:
    """The model's step time for the sample's features."""
    return model.features_time_s(sample.features)


def relative_errors(model: LatencyModel, samples: Sequence[Sample]) -> list[float]:
    """|predicted - measured| / measured per sample."""
    return [abs(predict_s(model, s) - s.duration_s) / s.duration_s for s in samples]


def median_rel_error(model: LatencyModel, samples: Sequence[Sample]) -> float:
    """The median of `relative_errors` (nan for no samples)."""
    errors = relative_errors(model, samples)
    return statistics.median(errors) if errors else math.nan


def term_shares(model: LatencyModel, samples: Sequence[Sample]) -> dict[str, float]:
    """Each non-zero term's share of the predicted time summed over `samples`."""
    totals = [0.0] * len(TERMS)
    for s in samples:
        for j, seconds in enumerate(model.terms_s(s.features)):
            totals[j] += seconds
    whole = math.fsum(totals)
    if whole <= 0:
        return {}
    return {t: v / whole for t, v in zip(TERMS, totals, strict=True) if v > 0}


def residuals_by_shape(model: LatencyModel, samples: Sequence[Sample]) -> dict[str, float]:
    """The median signed relative error (predicted / measured - 1) per kind of step:
    prefill only, decode only, mixed; where a model misses shows as a bias here."""
    groups: dict[str, list[float]] = {}
    for s in samples:
        f = s.features
        kind = (
            "mixed"
            if f.num_prefill_seqs and f.num_decode_seqs
            else "prefill"
            if f.num_prefill_seqs
            else "decode"
        )
        groups.setdefault(kind, []).append(predict_s(model, s) / s.duration_s - 1.0)
    return {k: statistics.median(v) for k, v in sorted(groups.items())}


# -- preset files ----------------------------------------------------------------------
def preset_fields(model: LatencyModel) -> dict[str, float]:
    """The model's coefficients by name, as a preset file holds them."""
    return {name: float(getattr(model, name)) for name in TERMS}


def write_preset(
    path: str | Path,
    latency: LatencyModel,
    transfer: Mapping[str, float] | None = None,
    overlap: bool | None = None,
    **info: Any,
) -> dict[str, Any]:
    """Write the model's coefficients, `"sim": {"overlap": ...}` when given (the preset
    describes an engine that overlaps planning with execution), the tier copy figures
    `transfer` (as `"kv": {"transfer": {...}}`, the config's own keys) and `info` (fit
    figures, model, device) as JSON; returns the document. Loading the preset
    (`sim.preset_file`) applies `sim.overlap` and `kv.transfer` where the config
    leaves them unset."""
    doc: dict[str, Any] = {**preset_fields(latency)}
    if overlap is not None:
        doc["sim"] = {"overlap": overlap}
    if transfer:
        doc["kv"] = {"transfer": dict(transfer)}
    doc.update(info)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def read_preset(path: str | Path) -> LatencyModel:
    """A latency model from a preset file written by `write_preset` (`kvflow calibrate`).
    The four original coefficients are required; the others default to 0, so presets
    written before they existed load unchanged.

    Raises:
        ConfigError: an unreadable file, a missing coefficient or a negative one.
    """
    try:
        doc = json.loads(read_small_file(Path(path), "sim.preset_file"))
    except ConfigError:
        raise  # names the file and says why already
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"sim.preset_file={str(path)!r}: cannot read it: {err}") from None
    values: dict[str, float] = {}
    for name in TERMS:
        value = doc.get(name) if isinstance(doc, dict) else None
        if value is None and name not in LINEAR_TERMS:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(
                f"sim.preset_file={str(path)!r}: {name} must be a number >= 0, got {value!r}"
            )
        values[name] = float(value)
    return LatencyModel(**values)


__all__ = [
    "GRID_WEIGHT",
    "LINEAR_TERMS",
    "RUNNER_TERMS",
    "Sample",
    "fit",
    "fit_live",
    "median_rel_error",
    "predict_s",
    "preset_fields",
    "read_preset",
    "relative_errors",
    "residuals_by_shape",
    "term_shares",
    "write_preset",
]
