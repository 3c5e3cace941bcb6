"""`kvflow router`: an OpenAI-compatible front door that routes over `kvflow serve`
instances."""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

from rich.console import Console

from kvflow.cli.common import CLIError
from kvflow.cli.serve import _port


def instance_url(text: str) -> str:
    """An instance's base URL (http://host:port, nothing after the port)."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise argparse.ArgumentTypeError(f"expected a URL like http://127.0.0.1:8001, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"an instance URL is its base (no path, query or fragment), got {text!r}"
        )
    return f"{parts.scheme}://{parts.netloc}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvflow.cluster.proxy_routing import names

    rp = sub.add_parser(
        "router",
        help="route OpenAI API requests over several kvflow serve instances",
        description="An OpenAI-compatible front door (POST /v1/completions and "
        "/v1/chat/completions, GET /v1/models, /health, /metrics) that sends each request "
        "to one of the --instance servers, streams answers through, and retries a refused "
        "(503) or unreachable instance's request elsewhere before any byte was sent.",
    )
    rp.add_argument(
        "--instance",
        dest="instances",
        action="append",
        type=instance_url,
        required=True,
        metavar="URL",
        help="an instance's base URL (repeat for each instance)",
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
        default="cache-aware",
        choices=names(),
        help="how to pick the instance (default: cache-aware)",
    )
    rp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback)"
    )
    rp.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    rp.add_argument(
        "--health-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between health checks and load scrapes of each instance (default: 0.5)",
    )
    rp.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from kvflow.cluster.proxy import RouterOptions, run_router
    from kvflow.cluster.proxy_routing import create

    if len(set(args.instances)) != len(args.instances):
        raise CLIError(f"--instance given twice: {', '.join(args.instances)}")
    both = set(args.instances) & set(args.prefill)
    if len(set(args.prefill)) != len(args.prefill) or both:
        raise CLIError(f"--prefill given twice or also as --instance: {', '.join(args.prefill)}")
    if not 0.01 <= args.health_interval <= 60:
        raise CLIError(f"--health-interval is in [0.01, 60] seconds, got {args.health_interval}")
    options = RouterOptions(
        instances=tuple(args.instances),
        router=args.router,
        health_interval_s=args.health_interval,
        prefill=tuple(args.prefill),
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    run_router(options, create(args.router), args.host, args.port)
    return 0
