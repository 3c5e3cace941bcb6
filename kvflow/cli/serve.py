"""`kvflow serve`: an OpenAI-compatible HTTP server around one engine."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from kvflow.cli.common import CLIError, add_config_arguments, config_overrides
from kvflow.cli.options import add_model_arguments


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "serve",
        help="serve a model over OpenAI's API (completions, chat, /metrics)",
        description="An OpenAI-compatible HTTP server around one kvflow engine: "
        "POST /v1/completions and /v1/chat/completions (streaming or not), GET /v1/models, "
        "/health and /metrics (Prometheus). Stops on SIGTERM/SIGINT after draining.",
    )
    sp.add_argument(
        "--engine",
        choices=["sim", "torch", "hf"],
        default="sim",
        help="runner: torch or hf serve --model; sim (default) needs no model: the "
        "simulated runner in real time with placeholder text (sim.* settings apply)",
    )
    add_model_arguments(sp, required=False)
    sp.add_argument(
        "--policy", default="fcfs", metavar="P", help="scheduling policy (default: fcfs)"
    )
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback)"
    )
    sp.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    sp.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send (default: the --model argument, or kvflow-sim)",
    )
    sp.add_argument(
        "--max-num-pending",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="most requests in flight; beyond it requests get 503 with Retry-After (default: 4096)",
    )
    sp.add_argument(
        "--on-close",
        choices=["drain", "abort"],
        default="drain",
        help="on SIGTERM: finish the requests in flight (drain, default) or abort them",
    )
    sp.add_argument(
        "--seed", type=int, default=0, help="seed of sampling for requests without a seed"
    )
    add_config_arguments(sp)
    sp.set_defaults(handler=run)


def _require_serve_extra() -> None:
    import importlib.util

    missing = [
        name
        for name in ("fastapi", "uvicorn", "prometheus_client")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise CLIError(f"kvflow serve needs {', '.join(missing)}: pip install 'kvflow[serve]'")


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.config import KVFlowConfig
    from kvflow.policies import names as policy_names
    from kvflow.serve.host import ServeOptions

    if args.engine == "sim" and args.model:
        raise CLIError("--model is for --engine torch|hf; --engine sim serves no model")
    if args.engine != "sim" and not args.model:
        raise CLIError(f"--engine {args.engine} needs --model DIR")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} is not a directory")
    _require_serve_extra()
    settings = config_overrides(args)
    KVFlowConfig.load(args.config, settings)  # fail on a bad setting before binding
    if args.policy not in policy_names():
        raise CLIError(
            f"--policy {args.policy!r} is not a known policy; known: {', '.join(policy_names())}"
        )
    options = ServeOptions(
        engine=args.engine,
        model=args.model,
        dtype=args.dtype,
        policy=args.policy,
        config_file=args.config,
        settings=settings,
        served_model_name=args.served_model_name,
        max_num_pending=args.max_num_pending,
        on_close=args.on_close,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from kvflow.serve.server import serve

    host = serve(options, args.host, args.port)
    if host.failure is not None:
        print(f"kvflow: error: {host.failure}", file=sys.stderr)
        return 1
    return 0
