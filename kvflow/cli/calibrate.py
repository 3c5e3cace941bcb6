"""`kvflow calibrate`: time a real runner and fit the simulator's latency model."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from rich.console import Console
from rich.table import Table

from kvflow.cli.common import CLIError, parse_comma_list
from kvflow.cli.options import add_model_arguments


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = sub.add_parser(
        "calibrate",
        help="time a real runner and fit the simulator's latency model to it",
        description="Time --engine's runner over a grid of step mixes (prefill tokens x "
        "decode sequences x context lengths), fit the simulated runner's four coefficients "
        "(non-negative least squares on relative error), report the fit's error on held-out "
        "mixes, and write a preset that `kvflow replay --set sim.preset_file=FILE` loads.",
    )
    cp.add_argument("--engine", choices=["torch", "hf"], default="torch", help="runner to time")
    add_model_arguments(cp, required=True)
    cp.add_argument("--out", metavar="PRESET.json", help="write the fitted preset here")
    cp.add_argument(
        "--repeat", type=int, default=5, metavar="N", help="timed runs per mix (median; 5)"
    )
    cp.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="per mix, the median of the timed runs (default) or their minimum (the step "
        "time of an idle machine; steadier where other work shares the CPU)",
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


def run(args: argparse.Namespace, console: Console) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from kvflow.engine_adapters import calibrate as cal
    from kvflow.engine_adapters.factory import build_runner, load_model

    if args.repeat < 1:
        raise CLIError(f"--repeat must be >= 1, got {args.repeat}")
    if args.block_size < 1:
        raise CLIError(f"--block-size must be >= 1, got {args.block_size}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    train_grid = cal.TRAIN_GRID
    for field, value in (
        ("prefill_tokens", args.prefill),
        ("decode_seqs", args.decode),
        ("context_lens", args.context),
    ):
        if value is not None:
            train_grid = dataclasses.replace(train_grid, **{field: value})
    model = load_model(args.model, args.engine, args.dtype)
    train = train_grid.mixes(model.max_position_embeddings)
    holdout = cal.HOLDOUT_GRID.mixes(model.max_position_embeddings)
    if len(train) < 4:
        raise CLIError(f"the training grid has {len(train)} mixes; 4 coefficients need >= 4")
    num_blocks = cal.blocks_needed([*train, *holdout], args.block_size)
    settings = {"kv.block_size": args.block_size, "kv.device.num_blocks": num_blocks}
    _, runner, store = build_runner(model, settings)
    sizes = {
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        "vocab_size": model.vocab_size,
    }
    device = _device_name(model.device)
    try:
        console.print(
            f"timing {len(train)} training and {len(holdout)} held-out mixes x {args.repeat} "
            f"on {device} ..."
        )
        # One interleaved measurement of both sets, so a slow spell skews neither.
        samples = cal.measure(
            runner, [*train, *holdout], repeat=args.repeat, statistic=args.statistic, **sizes
        )
        train_samples, holdout_samples = samples[: len(train)], samples[len(train) :]
    finally:
        store.close()
    fitted = cal.fit(train_samples)
    train_error = cal.median_rel_error(fitted, train_samples)
    holdout_error = cal.median_rel_error(fitted, holdout_samples)
    fit_info = {
        "median_rel_error": holdout_error,
        "num_points": len(train_samples),
        "train_median_rel_error": train_error,
        "num_holdout_points": len(holdout_samples),
        "repeat": args.repeat,
        "statistic": args.statistic,
    }
    info: dict[str, Any] = {
        "fit": fit_info,
        "model": str(args.model),
        "engine": args.engine,
        "dtype": str(model.layout["kv.layout.dtype"]),
        "device": device,
        "block_size": args.block_size,
    }
    table = Table(title=f"kvflow calibrate: {args.model} ({args.engine}, {device})")
    for header in ("fixed ms", "prefill tok us", "decode seq us", "KV tok ns", "train err",
                   "held-out err"):  # fmt: skip
        table.add_column(header, justify="right")
    table.add_row(
        f"{fitted.fixed_ms:.4g}",
        f"{fitted.prefill_token_us:.4g}",
        f"{fitted.decode_seq_us:.4g}",
        f"{fitted.kv_token_ns:.4g}",
        f"{train_error:.1%}",
        f"{holdout_error:.1%}",
    )
    console.print(table)
    console.print(
        f"median relative error of predicted step times: {holdout_error:.1%} on "
        f"{len(holdout_samples)} held-out mixes ({train_error:.1%} on {len(train_samples)} fitted)"
    )
    if args.out:
        cal.write_preset(args.out, fitted, **info)
        console.print(f"wrote {args.out}; use it with --set sim.preset_file={args.out}")
    if args.json:
        doc = {
            **cal.preset_fields(fitted),
            **info,
            "samples": [s._asdict() for s in train_samples],
            "holdout_samples": [s._asdict() for s in holdout_samples],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0
