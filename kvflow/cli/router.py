"""`kvflow router`: an OpenAI-compatible front door that routes over `kvflow serve`
instances."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from kvflow.cli.common import CLIError, add_config_arguments, single_instance_overrides
from kvflow.cli.options import port_number
from kvflow.cli.serve import add_http_arguments, http_limits, read_secret_file


def instance_url(text: str) -> str:
    """An instance's base URL (http://host:port, nothing after the port; the host in
    lower case, as DNS reads it)."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "https":
        # Its requests (and the API key) would go in the clear to a TLS port.
        raise argparse.ArgumentTypeError(
            f"the router speaks plain http:// to its instances (no TLS), got {text!r}"
        )
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise argparse.ArgumentTypeError(f"expected a URL like http://127.0.0.1:8001, got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise argparse.ArgumentTypeError(
            f"an instance URL has no user or password (the API key is --api-key), got {text!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"an instance URL is its base (no path, query or fragment), got {text!r}"
        )
    host = parts.hostname
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rp = sub.add_parser(
        "router",
        help="route OpenAI API requests over several kvflow serve instances",
        description="An OpenAI-compatible front door (POST /v1/completions and "
        "/v1/chat/completions, GET /v1/models, /health, /metrics) that sends each request "
        "to one of the --instance servers, chosen by a fleet router (the same code as "
        "`kvflow replay --instances N --router R`) from the instances' load and the block "
        "events of their peer services (`kvflow serve --peer-port`), streams answers "
        "through, and retries a refused (503) or unreachable instance's request "
        "elsewhere before any byte was sent.",
    )
    rp.add_argument(
        "--instance",
        dest="instances",
        action="append",
        type=instance_url,
        required=True,
        metavar="URL",
        help="an instance's base URL, http://HOST:PORT (repeat for each instance)",
    )
    rp.add_argument(
        "--prefill",
        action="append",
        type=instance_url,
        default=[],
        metavar="URL",
        help="a prefill instance's base URL (repeat for each; `kvflow serve --role "
        "prefill`): each request is prefilled there first and its KV handed to one of the "
        "--instance servers (`--role decode`), which pulls it (docs/fleet.md)",
    )
    rp.add_argument(
        "--router",
        default=None,
        metavar="R",
        help="how to pick the instance: round-robin, least-loaded, power-of-two, "
        "cache-aware or a plugin (default: router.name from the config, cache-aware)",
    )
    rp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback)"
    )
    rp.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    rp.add_argument(
        "--health-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between health checks and load scrapes of each instance (default: 0.5)",
    )
    rp.add_argument(
        "--model",
        metavar="DIR",
        help="the instances' checkpoint directory: its tokenizer turns text prompts into "
        "the token ids the instances cache (default: kvflow serve --engine sim's words)",
    )
    rp.add_argument(
        "--peer-secret-file",
        metavar="F",
        help="file holding the fleet's shared secret (peer.secret), to follow instances "
        "whose peer services are off loopback",
    )
    add_config_arguments(rp)
    add_http_arguments(rp)
    rp.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.live import LiveFleet
    from kvflow.cluster.proxy import RouterOptions, run_router
    from kvflow.cluster.routers import create
    from kvflow.config import KVFlowConfig
    from kvflow.engine_adapters.text import HFTextCodec, PlaceholderCodec, TextCodec

    if len(set(args.instances)) != len(args.instances):
        raise CLIError(f"--instance given twice: {', '.join(args.instances)}")
    both = set(args.instances) & set(args.prefill)
    if len(set(args.prefill)) != len(args.prefill) or both:
        raise CLIError(f"--prefill given twice or also as --instance: {', '.join(args.prefill)}")
    if not 0.01 <= args.health_interval <= 60:
        raise CLIError(f"--health-interval is in [0.01, 60] seconds, got {args.health_interval}")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} is not a directory")
    settings = single_instance_overrides(args)
    if args.peer_secret_file is not None:
        settings["peer.secret"] = read_secret_file(args.peer_secret_file)
    config = KVFlowConfig.load(args.config, settings)
    name = args.router or config.router.name
    router = create(name, config)
    codec: TextCodec = HFTextCodec.from_model_dir(args.model) if args.model else PlaceholderCodec()
    limits = http_limits(args)
    options = RouterOptions(
        instances=tuple(args.instances),
        health_interval_s=args.health_interval,
        prefill=tuple(args.prefill),
        limits=limits,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    # The prefill instances are routed among by a router of their own (its own state).
    prefill_router = create(name, config) if options.prefill else None
    fleet = LiveFleet(options.instances, config, router, options.prefill, prefill_router)
    run_router(options, fleet, codec, args.host, args.port)
    return 0
