"""What `kvflow calibrate` prints: the fit's table and figures, the engine's timing, and
the validation's table."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table


def print_fit(
    console: Console, args: argparse.Namespace, device: str, fitted: Any, info: dict[str, Any]
) -> None:
    from kvflow.engine_adapters import calibrate as cal

    shares = info["term_shares"]
    table = Table(title=f"kvflow calibrate: {args.model} ({args.engine}, {device})")
    for header in ("term", "coefficient", "share of fitted time"):
        table.add_column(header, justify="right")
    for name, value in cal.preset_fields(fitted).items():
        share = f"{shares[name]:.1%}" if name in shares else ""
        table.add_row(name, f"{value:.4g}", share)
    console.print(table)
    drift = info["drift"]
    drifted = (
        f"; {info['raw_noise_median_rel_spread']:.1%} before the machine's drift was divided "
        f"out: its speed factor ranged {drift['p10']:.2f}-{drift['p90']:.2f} (10th-90th "
        f"percentile; {drift['min']:.2f}-{drift['max']:.2f} in all) of its median"
        if drift["neighbours"]
        else ""
    )
    console.print(
        f"median relative error of predicted step times: {info['median_rel_error']:.1%} on "
        f"{info['num_holdout_points']} held-out mixes ({info['train_median_rel_error']:.1%} on "
        f"{info['num_points']} fitted; the four-term linear model: "
        f"{info['linear_median_rel_error']:.1%}); run-to-run noise of the timings: "
        f"{info['noise_median_rel_spread']:.1%} (median spread between two halves of the "
        f"runs{drifted}); median signed error by kind of step: "
        + ", ".join(f"{k} {v:+.1%}" for k, v in info["holdout_bias_by_shape"].items())
    )
    engine = info.get("engine")
    if engine:
        console.print(
            f"engine overhead: {fitted.step_overhead_ms:.3g} ms per step + "
            f"{fitted.seq_overhead_us:.3g} us per scheduled request; whole engine steps "
            f"predicted within {engine['median_rel_error']:.1%} median over "
            f"{engine['num_steps']} busy steps (the grid's runner model alone, against the "
            f"runner's time in the engine: {engine['runner_median_rel_error']:.1%}, measured / "
            f"predicted {engine['runner_scale']:.3g}"
            + (
                "; the runner's terms refitted on the engine's steps with the grid beside "
                f"them: {engine['live_median_rel_error']:.1%}"
                if engine.get("refitted")
                else ", applied to the runner's terms"
                if engine["rescaled"]
                else ""
            )
            + f"; noise "
            f"{engine['noise_median_rel_dev']:.1%}); median signed error by kind of step: "
            + ", ".join(f"{k} {v:+.1%}" for k, v in engine["bias_by_shape"].items())
            + _probed_note(engine.get("machine_speed_probed"))
        )


def _probed_note(probed: float | None) -> str:
    if probed is None:
        return ""
    return (
        f"; the machine ran at {probed:.3g}x the grid's step times around it (probed before "
        "and after; reported, not applied)"
    )


def print_validation(console: Console, checked: Any) -> None:
    table = Table(
        title="validation: simulated vs real (error = sim / mean of the real runs - 1; "
        "spread = (largest - smallest real run) / mean)"
    )
    headers = ["metric", "real runs", "simulated", "error", "real spread"]
    paired = {
        "error at run speed": "error_at_speed",
        "error at probed speed": "error_at_probed_speed",
        "error at step times": "error_at_step_times",
    }
    shown = {
        header: field
        for header, field in paired.items()
        if any(getattr(row, field) is not None for row in checked.rows)
    }
    for header in [*headers, *shown]:
        table.add_column(header, justify="right")
    for row in checked.rows:
        spread = "" if row.spread is None else f"{row.spread:.1%}"
        runs = ", ".join(f"{v:.4g}" for v in row.real_runs)
        cells = [row.metric, runs, f"{row.simulated:.4g}", f"{row.error:+.1%}", spread]
        for field in shown.values():
            e = getattr(row, field)
            cells.append("" if e is None else f"{e:+.1%}")
        table.add_row(*cells)
    console.print(table)
    if checked.speeds:
        console.print(
            "each real run's steps against the model (measured / predicted, summed over its "
            "steps; 1 = the model priced that run's own steps right; 'error at run speed' "
            "is the simulation repeated at each run's whole-step speed against that run): "
            + "; ".join(
                f"run {i}: runner {s.runner:.3g}, whole engine step {s.engine:.3g}"
                + ("" if s.probe is None else f", the machine probed around it {s.probe:.3g}")
                for i, s in enumerate(checked.speeds, 1)
            )
            + (
                " ('error at probed speed': the simulation with every term scaled by the "
                "machine's speed around the run, calibrated mixes timed just before and after "
                "it, against that run)"
                if any(s.probe is not None for s in checked.speeds)
                else ""
            )
        )
    if checked.schedule_matched:
        console.print(
            "'error at step times' is the simulation with each real run's own step times "
            "(no latency model left: the schedule's error alone); steps it scheduled as "
            "the run did: " + ", ".join(f"{m:.0%}" for m in checked.schedule_matched)
        )


__all__ = ["print_fit", "print_validation"]
