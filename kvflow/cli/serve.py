"""`kvflow serve`: an OpenAI-compatible HTTP server around one engine."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from kvflow.cli.common import CLIError, add_config_arguments, single_instance_overrides
from kvflow.cli.options import (
    add_model_arguments,
    check_engine_model,
    port_number,
    positive_int,
)

if TYPE_CHECKING:
    from kvflow.serve.limits import HTTPLimits


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
    sp.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    sp.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send (default: the --model argument, or kvflow-sim)",
    )
    sp.add_argument(
        "--max-num-pending",
        type=positive_int,
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
    sp.add_argument(
        "--role",
        choices=["both", "prefill", "decode"],
        default="both",
        help="prefill/decode disaggregation (docs/fleet.md): prefill keeps a prompt's KV "
        "for a decode instance when a request asks (kvflow_handoff), decode pulls it from "
        "there; both (default) serves whole requests and does either when asked. "
        "prefill and decode run the peer service (--peer-port, default any free port); "
        "decode needs a cpu tier (kv.cpu.num_blocks) to pull into",
    )
    peer = sp.add_argument_group(
        "peer-to-peer KV sharing", "pull cached prefixes from other instances (docs/peer.md)"
    )
    peer.add_argument(
        "--peer-port",
        type=port_number,
        metavar="P",
        help="run the peer service on this port (peer.port; 0: any free port); it binds "
        "peer.host (default 127.0.0.1: loopback; any other address needs a secret); with "
        "--engine sim it publishes block events only (for kvflow router)",
    )
    peer.add_argument(
        "--peers",
        metavar="HOST:PORT,...",
        help="peer services to connect to and pull from (a static list; implies the peer service)",
    )
    peer.add_argument(
        "--peer-secret-file",
        metavar="F",
        help="file holding the fleet's shared secret (peer.secret; first line)",
    )
    peer.add_argument(
        "--model-id",
        metavar="ID",
        help="identity of the weights in the model fingerprint (peer.model_id; default "
        "with peers: the served model name): instances exchange blocks only when it "
        "matches, and a persistent disk tier (kv.disk.persist) is reused only by it",
    )
    add_http_arguments(sp)
    add_config_arguments(sp)
    sp.set_defaults(handler=run)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP front end's guards (`kvflow.serve.limits`), for serve and router."""
    group = parser.add_argument_group("access and limits")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (401 "
        "otherwise); default: the KVFLOW_API_KEY environment variable, else no key",
    )
    group.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=32 * 2**20,
        metavar="N",
        help="largest request body taken; larger ones get 413 (default: 33554432, 32 MiB)",
    )
    group.add_argument(
        "--max-concurrent-requests",
        type=positive_int,
        default=4096,
        metavar="N",
        help="most POST requests in flight, streams included; more get 429 with "
        "Retry-After (default: 4096)",
    )


def http_limits(args: argparse.Namespace) -> HTTPLimits:
    """The guards the arguments ask for; the API key from KVFLOW_API_KEY when not given."""
    from kvflow.serve.limits import API_KEY_ENV, HTTPLimits

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        source = "--api-key" if args.api_key is not None else API_KEY_ENV
        raise CLIError(f"{source} is empty: give a key, or leave it out to serve without one")
    return HTTPLimits(
        api_key=key.strip() if key is not None else None,
        max_body_bytes=args.max_body_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
    )


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

    check_engine_model(args)
    _require_serve_extra()
    settings = single_instance_overrides(args)
    peers = _peer_settings(args, settings)
    if args.role != "both" and peers is None:
        if args.engine == "sim":
            raise CLIError(f"--role {args.role} needs --engine torch or hf (sim holds no KV bytes)")
        peers = ()  # the role runs the peer service
    config = KVFlowConfig.load(args.config, settings)  # fail on a bad setting before binding
    if args.model_id is not None and peers is None and not config.kv.disk.persist:
        raise CLIError(
            "--model-id keys blocks shared with peers or kept on disk: it needs --peer-port, "
            "--peers or kv.disk.persist=true"
        )
    if args.role == "decode" and config.kv.tier_blocks("cpu") == 0:
        raise CLIError(
            "--role decode pulls handed-off KV into the cpu tier: set kv.cpu.num_blocks "
            "(e.g. --set kv.cpu.num_blocks=4096)"
        )
    if peers is not None:
        from kvflow.peer.identity import PeerConfigError, check_bind

        try:
            check_bind(config.peer)
        except PeerConfigError as err:
            raise CLIError(str(err)) from None
    if args.policy not in policy_names():
        raise CLIError(
            f"--policy {args.policy!r} is not a known policy; known: {', '.join(policy_names())}"
        )
    limits = http_limits(args)
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
        peers=peers,
        role=args.role,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from kvflow.serve.server import serve

    host = serve(options, args.host, args.port, limits)
    if host.failure is not None:
        print(f"kvflow: error: {host.failure}", file=sys.stderr)
        return 1
    return 0


def _peer_settings(args: argparse.Namespace, settings: dict[str, object]) -> tuple[str, ...] | None:
    """Fold the peer options into `settings`; the peer list, or None without a peer layer."""
    if args.model_id is not None:  # keys a persistent disk tier too (checked in `run`)
        settings["peer.model_id"] = args.model_id
    if args.peer_port is None and args.peers is None:
        if args.peer_secret_file:
            raise CLIError("--peer-secret-file needs --peer-port or --peers")
        return None
    if args.engine == "sim" and args.peers is not None:
        raise CLIError("--peers needs --engine torch or hf (sim holds no KV bytes to pull)")
    from kvflow.peer.node import PeerAddress

    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    seen: set[PeerAddress] = set()
    for text in peers:
        try:
            address = PeerAddress.parse(text)
        except ValueError as err:
            raise CLIError(f"--peers: {err}") from None
        if address in seen:
            raise CLIError(f"--peers lists {text!r} twice")
        seen.add(address)
    if args.peer_port is not None:
        if args.peer_port == args.port and args.port != 0:
            raise CLIError(f"--peer-port {args.peer_port} is the HTTP --port: give each its own")
        settings["peer.port"] = args.peer_port
    if args.peer_secret_file is not None:
        settings["peer.secret"] = read_secret_file(args.peer_secret_file)
    return peers


def read_secret_file(text: str) -> str:
    """The shared secret on the first line of the file `text` (`--peer-secret-file`)."""
    from kvflow.config import ConfigError, read_small_file

    path = Path(text)
    try:  # bounded, and only a regular file: /dev/zero or a FIFO never ends
        lines = read_small_file(path, "--peer-secret-file", 64 * 2**10).splitlines()
    except ConfigError as err:
        raise CLIError(str(err)) from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise CLIError(f"--peer-secret-file {str(path)!r}: the first line is empty")
    return secret
