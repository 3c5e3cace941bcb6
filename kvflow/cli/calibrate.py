"""`kvflow calibrate`: time a real runner and fit the simulator's latency model."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from rich.console import Console

from kvflow.cli.calibrate_phases import drift_figures, time_engine, time_tiers
from kvflow.cli.calibrate_report import print_fit, print_validation
from kvflow.cli.common import CLIError, parse_comma_list, single_instance_overrides
from kvflow.cli.options import add_model_arguments
from kvflow.cli.outputs import check_outputs, model_files


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(
        parse_comma_list(
            text,
            int,
            lambda v: v >= 0,
            malformed="expected integers like 0,32,128",
            invalid="expected integers >= 0",
        )
    )


def _mib_list(text: str) -> tuple[float, ...]:
    return tuple(
        parse_comma_list(
            text,
            float,
            lambda v: v > 0,
            malformed="expected sizes in MiB like 1,4,16",
            invalid="expected sizes > 0",
        )
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = sub.add_parser(
        "calibrate",
        help="time a real runner and fit the simulator's latency model to it",
        description="Time --engine's runner over a grid of step mixes (prefill chunks, "
        "decode sequences, contexts), fit the simulated runner's latency model (non-negative "
        "least squares on relative error), time the async engine's overhead around it and the "
        "store's tier copies, report the fit's error on held-out mixes (and with --validate, "
        "on a whole trace), and write a preset that `kvflow replay --set sim.preset_file=FILE` "
        "loads.",
    )
    cp.add_argument("--engine", choices=["torch", "hf"], default="torch", help="runner to time")
    add_model_arguments(cp, required=True)
    cp.add_argument("--out", metavar="PRESET.json", help="write the fitted preset here")
    cp.add_argument("--repeat", type=int, default=5, metavar="N", help="timed runs per mix (5)")
    cp.add_argument(
        "--statistic",
        choices=["median", "mean", "min"],
        default="median",
        help="per mix, the median of the timed runs (default; predicts a machine as loaded "
        "as during calibration), their mean, or their minimum (an idle machine's step time)",
    )
    cp.add_argument(
        "--cold",
        dest="warm",
        action="store_false",
        help="time each mix right after another mix (default: after an untimed run of the "
        "same mix, as a live engine's step follows steps of like shape)",
    )
    cp.add_argument(
        "--drift-neighbours",
        type=int,
        default=5,
        metavar="N",
        help="divide the machine's drift out of the grid's timings, its speed at each timed "
        "run told by the N runs of other mixes on each side (default 5; 0 keeps the raw "
        "timings)",
    )
    cp.add_argument(
        "--engine-requests",
        type=int,
        default=64,
        metavar="N",
        help="time the async engine's whole steps over N requests in real time and fit its "
        "overhead per step and per request (default 64; 0 skips it)",
    )
    cp.add_argument(
        "--no-rescale",
        dest="rescale",
        action="store_false",
        help="keep the grid's fit of the runner's terms (default: refit them on the engine's "
        "live steps, with the grid weighing 10%% beside them)",
    )
    cp.add_argument(
        "--no-tiers",
        dest="tiers",
        action="store_false",
        help="skip timing the store's tier copies (kv.transfer.* of the preset)",
    )
    cp.add_argument("--tier-dir", metavar="DIR", help="directory for the disk tier's test slab")
    cp.add_argument(
        "--tier-mib",
        type=_mib_list,
        default=(1.0, 4.0, 16.0),
        metavar="MIB,..",
        help="copy batch sizes to time each tier direction at (default 1,4,16)",
    )
    cp.add_argument(
        "--validate",
        metavar="TRACE",
        help="replay TRACE in real time (--validate-runs times) and once simulated with the "
        "fitted model and compare TTFT/TPOT/ITL/E2E percentiles, steps and hit rate (kept in "
        "the preset's fit)",
    )
    cp.add_argument(
        "--validate-runs",
        type=int,
        default=2,
        metavar="N",
        help="real-time runs of the --validate trace (default 2: their mean is the real "
        "figure, their range the machine's run-to-run spread)",
    )
    cp.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="KEY=VALUE",
        help="config override for the engine timing and the validation runs, both real and "
        "simulated (e.g. scheduler.max_num_batched_tokens=512)",
    )
    cp.add_argument("--block-size", type=int, default=16, metavar="N", help="KV block size (16)")
    cp.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (1 gives the steadiest timings on a shared machine)",
    )
    grid = cp.add_argument_group("the training grid (held-out mixes lie between its values)")
    grid.add_argument("--prefill", type=_int_list, metavar="N,..", help="prefill tokens per step")
    grid.add_argument("--decode", type=_int_list, metavar="N,..", help="decoding sequences")
    grid.add_argument("--context", type=_int_list, metavar="N,..", help="decode context lengths")
    cp.add_argument("--json", metavar="OUT", help="also write the fit and every sample as JSON")
    cp.set_defaults(handler=run)


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _grid(args: argparse.Namespace) -> Any:
    import dataclasses

    from kvflow.engine_adapters import calibrate as cal

    train_grid = cal.TRAIN_GRID
    for field, value in (
        ("prefill_tokens", args.prefill),
        ("decode_seqs", args.decode),
        ("context_lens", args.context),
    ):
        if value is not None:
            train_grid = dataclasses.replace(train_grid, **{field: value})
    return train_grid


def _check_destinations(args: argparse.Namespace) -> None:
    """--out and --json are writable, and name none of the inputs: a file of the model
    directory (its config.json, say) or the --validate trace."""
    inputs: dict[str, str | Path | None] = {"the --validate trace": args.validate}
    inputs.update(model_files(args.model))
    check_outputs({"--out": args.out, "--json": args.json}, {}, inputs)


def run(args: argparse.Namespace, console: Console) -> int:

    from kvflow.engine_adapters import calibrate as cal
    from kvflow.engine_adapters.factory import build_runner, load_model

    if args.repeat < 1:
        raise CLIError(f"--repeat must be >= 1, got {args.repeat}")
    if args.block_size < 1:
        raise CLIError(f"--block-size must be >= 1, got {args.block_size}")
    if args.validate_runs < 1:
        raise CLIError(f"--validate-runs must be >= 1, got {args.validate_runs}")
    if args.drift_neighbours < 0:
        raise CLIError(f"--drift-neighbours must be >= 0, got {args.drift_neighbours}")
    if args.engine_requests < 0:
        raise CLIError(f"--engine-requests must be >= 0, got {args.engine_requests}")
    _check_destinations(args)  # before minutes of timing, and never over an input
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    settings = {"kv.block_size": args.block_size, **single_instance_overrides(args)}
    validate_requests = _validation_trace(args) if args.validate else None
    model = load_model(args.model, args.engine, args.dtype)
    settings.setdefault("scheduler.max_model_len", model.max_position_embeddings)
    train = _grid(args).mixes(model.max_position_embeddings)
    holdout = cal.HOLDOUT_GRID.mixes(model.max_position_embeddings)
    if len(train) < len(cal.RUNNER_TERMS):
        raise CLIError(
            f"the training grid has {len(train)} mixes; {len(cal.RUNNER_TERMS)} coefficients "
            f"need >= {len(cal.RUNNER_TERMS)}"
        )
    num_blocks = cal.blocks_needed([*train, *holdout], args.block_size)
    _, runner, store = build_runner(
        model, {"kv.block_size": args.block_size, "kv.device.num_blocks": num_blocks}
    )
    sizes = {
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        "vocab_size": model.vocab_size,
    }
    device = _device_name(model.device)
    try:
        return _calibrate(args, console, model, runner, train, holdout, sizes, settings,
                          validate_requests, device)  # fmt: skip
    finally:
        store.close()


def _calibrate(
    args: argparse.Namespace,
    console: Console,
    model: Any,
    runner: Any,
    train: list[Any],
    holdout: list[Any],
    sizes: dict[str, int],
    settings: dict[str, Any],
    validate_requests: list[Any] | None,
    device: str,
) -> int:
    """Time the grid on `runner`, fit, then the engine, the tiers and the validation,
    the grid's runner kept for the speed probes between them."""
    import json
    import statistics
    from pathlib import Path

    from kvflow.engine_adapters import calibrate as cal

    console.print(
        f"timing {len(train)} training and {len(holdout)} held-out mixes x {args.repeat} "
        f"on {device} ..."
    )
    # One interleaved measurement of both sets, so a slow spell skews neither.
    measured = cal.measure(
        runner,
        [*train, *holdout],
        repeat=args.repeat,
        statistic=args.statistic,
        warm=args.warm,
        drift_neighbours=args.drift_neighbours,
        **sizes,
    )
    train_samples = measured.samples[: len(train)]
    holdout_samples = measured.samples[len(train) :]
    fitted = cal.fit(train_samples)
    linear = cal.fit(train_samples, cal.LINEAR_TERMS)
    noise = statistics.median(measured.spreads)
    fit_info: dict[str, Any] = {
        "median_rel_error": cal.median_rel_error(fitted, holdout_samples),
        "num_points": len(train_samples),
        "train_median_rel_error": cal.median_rel_error(fitted, train_samples),
        "num_holdout_points": len(holdout_samples),
        "noise_median_rel_spread": noise,
        "raw_noise_median_rel_spread": statistics.median(measured.raw_spreads),
        "drift": drift_figures(measured.drift, args.drift_neighbours),
        "linear_median_rel_error": cal.median_rel_error(linear, holdout_samples),
        "holdout_bias_by_shape": cal.residuals_by_shape(fitted, holdout_samples),
        "term_shares": cal.term_shares(fitted, train_samples),
        "repeat": args.repeat,
        "statistic": args.statistic,
        "warm": args.warm,
    }
    # The machine's speed against the grid's, probed around the engine's timing and each
    # validation run (reported, not applied); not with the drift left in.
    probe = (
        cal.SpeedProbe.of(
            runner,
            train,
            train_samples,
            block_size=sizes["block_size"],
            num_blocks=sizes["num_blocks"],
            vocab_size=sizes["vocab_size"],
        )
        if args.drift_neighbours
        else None
    )
    engine_steps: list[Any] = []
    validation_steps: list[Any] = []
    if args.engine_requests:
        fitted, fit_info["engine"], engine_steps = time_engine(
            args, console, model, fitted, settings, train_samples, probe
        )
    transfer = time_tiers(args, console, model) if args.tiers else None
    print_fit(console, args, device, fitted, fit_info)
    if validate_requests is not None:
        from kvflow.traces.validate import validate

        console.print(
            f"validating on {args.validate} ({len(validate_requests)} requests): "
            f"{args.validate_runs} real-time run(s) and one simulated ..."
        )
        checked = validate(
            validate_requests, model, fitted, settings, real_runs=args.validate_runs, probe=probe
        )
        validation_steps = [
            [{**s.features._asdict(), "execute_s": s.execute_s, "started_at": s.started_at,
              "planned_at": s.planned_at} for s in run]
            for run in checked.steps
        ]  # fmt: skip
        fit_info["validation"] = {"trace": str(args.validate), **checked.to_json()}
        print_validation(console, checked)
    info: dict[str, Any] = {
        "fit": fit_info,
        "model": str(args.model),
        "engine": args.engine,
        "dtype": str(model.layout["kv.layout.dtype"]),
        "device": device,
        "block_size": args.block_size,
    }
    if args.out:
        cal.write_preset(args.out, fitted, transfer, overlap=runner.supports_overlap, **info)
        console.print(f"wrote {args.out}; use it with --set sim.preset_file={args.out}")
    if args.json:
        doc = {
            **cal.preset_fields(fitted),
            **({"kv": {"transfer": transfer}} if transfer else {}),
            **info,
            "samples": [s.to_json() for s in train_samples],
            "holdout_samples": [s.to_json() for s in holdout_samples],
            "spreads": measured.spreads,
            "drift": measured.drift,
            "engine_steps": [
                {**s.features._asdict(), "execute_s": s.execute_s, "period_s": s.period_s}
                for s in engine_steps
            ],
            "validation_steps": validation_steps,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")

    return 0


def _validation_trace(args: argparse.Namespace) -> list[Any]:
    from kvflow.cli.common import load_requests

    requests = load_requests(argparse.Namespace(trace=args.validate))
    if not requests:
        raise CLIError(f"--validate {args.validate}: the trace has no requests")
    return requests
