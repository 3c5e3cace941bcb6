"""PNG plots of replays and sweeps (matplotlib, the ``plot`` extra).

matplotlib is imported only when a plot is drawn, and only its object-oriented API with
the Agg canvas is used, so nothing here touches pyplot's global state or a display.

Files `write_replay_plots` writes into a directory:

| file | what |
| --- | --- |
| `ttft_cdf.png` | CDF of TTFT per policy (served requests) |
| `e2e_cdf.png` | CDF of end-to-end latency per policy |
| `timeseries_<policy>.png` | over virtual time: queue length, running batch size, |
| | device KV usage and cumulative prefix hit rate |

`plot_sweep` writes goodput and SLO attainment versus offered rate, a line per policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.request import FinishReason, RequestState
from kvflow.traces.metrics import request_outcome
from kvflow.traces.timeseries import TimeSeries

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from kvflow.traces.sweep import SweepPoint

INSTALL_HINT = "plots need matplotlib: pip install 'kvflow[plot]'"
MAX_CDF_POINTS = 1000
_DPI = 100
_SERVED = (FinishReason.LENGTH, FinishReason.STOP)


class PlotDependencyError(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise `PlotDependencyError` (with the install hint) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotDependencyError(INSTALL_HINT) from None


def _figure(width_in: float, height_in: float, num_rows: int = 1) -> tuple[Figure, list[Axes]]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, 1, sharex=True, squeeze=False)
    return figure, [row[0] for row in axes]


@dataclass(frozen=True, slots=True)
class LatencyCDF:
    """An empirical CDF, at most `MAX_CDF_POINTS` points: `fractions[i]` of the values
    are <= `values_ms[i]`."""

    values_ms: list[float]
    fractions: list[float]

    @classmethod
    def of(cls, values_ms: Sequence[float], max_points: int = MAX_CDF_POINTS) -> LatencyCDF:
        """The CDF of `values_ms`, thinned to evenly spaced ranks (the largest kept)."""
        ordered = sorted(values_ms)
        n = len(ordered)
        if n == 0:
            return cls([], [])
        step = max(1, math.ceil(n / max_points))
        ranks = list(range(step - 1, n, step))
        if ranks[-1] != n - 1:
            ranks.append(n - 1)
        return cls([ordered[i] for i in ranks], [(i + 1) / n for i in ranks])


def latency_cdfs(states: Sequence[RequestState]) -> dict[str, LatencyCDF]:
    """``{"ttft_ms": ..., "e2e_ms": ...}`` CDFs over the served requests of a run."""
    ttft_ms: list[float] = []
    e2e_ms: list[float] = []
    for state in states:
        if state.finish_reason not in _SERVED:
            continue
        outcome = request_outcome(state)
        if outcome.ttft_s is not None:
            ttft_ms.append(outcome.ttft_s * 1000.0)
        if outcome.e2e_s is not None:
            e2e_ms.append(outcome.e2e_s * 1000.0)
    return {"ttft_ms": LatencyCDF.of(ttft_ms), "e2e_ms": LatencyCDF.of(e2e_ms)}


def file_stem(name: str) -> str:
    """`name` (a policy) made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def plot_cdfs(cdfs: Mapping[str, LatencyCDF], title: str, path: Path) -> Path:
    """One CDF line per policy (`cdfs` by policy) into `path`."""
    figure, (ax,) = _figure(7.0, 4.5)
    lowest = min((c.values_ms[0] for c in cdfs.values() if c.values_ms), default=1.0)
    highest = max((c.values_ms[-1] for c in cdfs.values() if c.values_ms), default=1.0)
    for policy, cdf in cdfs.items():
        ax.step(cdf.values_ms, cdf.fractions, where="post", label=policy)
    if lowest > 0 and highest / lowest > 100:
        ax.set_xscale("log")
    ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0.0, 1.01))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    figure.savefig(path)
    return path


def plot_timeseries(policy: str, series: TimeSeries, path: Path) -> Path:
    """Queue length, batch size, KV usage and hit rate of one replay into `path`."""
    figure, axes = _figure(8.0, 8.0, num_rows=4)
    panels: tuple[tuple[Sequence[float], str, str], ...] = (
        (series.num_waiting, "queue length", "requests"),
        (series.num_batched, "running batch size", "requests"),
        ([100.0 * u for u in series.kv_usage], "device KV usage", "% of blocks"),
        ([100.0 * h for h in series.hit_rate], "cumulative prefix hit rate", "% of tokens"),
    )
    for ax, (values, title, unit) in zip(axes, panels, strict=True):
        ax.plot(series.time_s, values, linewidth=1.0)
        ax.set(title=title, ylabel=unit)
        ax.grid(True, alpha=0.3)
    axes[2].set_ylim(0.0, 101.0)
    axes[3].set_ylim(0.0, 101.0)
    axes[-1].set_xlabel("virtual time (s)")
    figure.suptitle(f"{policy}: one sample every {series.step_stride} step(s)")
    figure.savefig(path)
    return path


def write_replay_plots(
    out_dir: Path,
    cdfs: Mapping[str, Mapping[str, LatencyCDF]],
    series: Mapping[str, TimeSeries],
) -> list[Path]:
    """The replay PNGs (see the module doc) into `out_dir`, made if missing.

    Args:
        out_dir: the directory.
        cdfs: by policy, the output of `latency_cdfs`.
        series: by policy, the recorded time series.

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_cdfs(
            {policy: by_metric["ttft_ms"] for policy, by_metric in cdfs.items()},
            "TTFT (arrival to first token)",
            out_dir / "ttft_cdf.png",
        ),
        plot_cdfs(
            {policy: by_metric["e2e_ms"] for policy, by_metric in cdfs.items()},
            "E2E latency (arrival to last token)",
            out_dir / "e2e_cdf.png",
        ),
    ]
    for policy, samples in series.items():
        written.append(
            plot_timeseries(policy, samples, out_dir / f"timeseries_{file_stem(policy)}.png")
        )
    return written


def plot_sweep(points: Sequence[SweepPoint], path: Path, attainment_target: float = 0.9) -> Path:
    """Goodput and SLO attainment versus offered rate, a line per curve (a policy, or
    a policy on one fleet shape), into `path`."""
    figure, (top, bottom) = _figure(7.0, 7.0, num_rows=2)
    labels = list(dict.fromkeys(p.label for p in points))
    for label in labels:
        mine = sorted((p for p in points if p.label == label), key=lambda p: p.rate_rps)
        rates = [p.rate_rps for p in mine]
        top.plot(rates, [p.report.goodput_rps for p in mine], marker="o", label=label)
        bottom.plot(rates, [100.0 * p.report.slo_attainment for p in mine], marker="o", label=label)
    top.set(title="goodput (requests/s meeting every SLO)", ylabel="requests/s")
    bottom.axhline(100.0 * attainment_target, color="gray", linestyle="--", linewidth=1.0)
    bottom.set(title="SLO attainment", ylabel="% of served requests", ylim=(0.0, 101.0))
    bottom.set_xlabel("offered load (requests/s)")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
