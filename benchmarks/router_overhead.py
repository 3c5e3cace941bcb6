"""What `kvflow router` adds: TTFT and streamed tokens/s of the same requests sent
straight to one `kvflow serve --engine sim` instance (zero-cost latency model, its peer
service on, as `kvflow cluster up` starts it) and through a `kvflow router` in front of
it (`--router`, default cache-aware, following the instance's block events), in the
same run.

Both processes are started here (`python -m kvflow serve`, `python -m kvflow router
--instance URL`); this process is the client, `--client raw` (default:
`benchmarks/serve_overhead.py`'s minimal load generator, one keep-alive connection per
stream, which costs next to nothing per chunk, so the figures are the servers') or
`--client httpx` (`kvflow replay --endpoint`'s client). Each round sends `--clients`
concurrent streams straight, then as many through the router (new prompts each time:
nothing hits the prefix cache); the order alternates per round. Round 0 warms up and is
not reported. Prints one JSON line per round and path, then one with the medians, and
the medians over rounds of each round's tokens/s ratio (router / straight) and added TTFT
(router minus straight, p50 and p99), and the router's own forwarding time (arrival to
sending, from its `kvflow:router_added_latency_seconds`):

    python benchmarks/router_overhead.py [--clients 16] [--output-tokens 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import (
    UVLOOP,
    ZERO_COST,
    free_port,
    http_round,
    prompts,
    raw_round,
    wait_until_serving,
)

from kvflow.traces.endpoint_client import Connections, client_maker, first_model


def _sets(settings: dict[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def start(args: Sequence[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "kvflow", *args, "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def forwarding_quantiles(router: str) -> dict[str, float]:
    """The router's own time from a request's arrival to its forwarding (reading,
    parsing, routing), p50 and p99 in ms, from its histogram (the upper bound of the
    bucket the quantile falls in; the warm-up round included)."""
    text = httpx.get(f"{router}/metrics", timeout=10).text
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "kvflow:router_added_latency_seconds_bucket"
    )
    total = buckets[-1][1]
    return {
        f"router_forwarding_{q}_ms": next(le for le, n in buckets if n >= total * f) * 1e3
        for q, f in (("p50", 0.5), ("p99", 0.99))
    }


async def run(args: argparse.Namespace, direct: str, routed: str) -> list[dict[str, Any]]:
    ways = {
        "straight": Connections(client_maker(direct, timeout_s=60), args.clients),
        "router": Connections(client_maker(routed, timeout_s=60), args.clients),
    }
    ports = {
        way: int(url.rsplit(":", 1)[1]) for way, url in (("straight", direct), ("router", routed))
    }
    lines: list[dict[str, Any]] = []
    try:
        async with ways["straight"].client() as client:
            model = await first_model(client, direct)
        for r in range(args.rounds + 1):
            order = ["straight", "router"] if r % 2 == 0 else ["router", "straight"]
            sides = {}
            for k, way in enumerate(order):
                batch = prompts(2 * r + k, args.clients, args.prompt_tokens)
                if args.client == "raw":
                    address = ("127.0.0.1", ports[way])
                    side = await raw_round(address, model, batch, args.output_tokens)
                else:
                    side = await http_round(ways[way], model, batch, args.output_tokens)
                sides[way] = side.summary()
            if r == 0:
                continue
            for way, summary in sides.items():
                lines.append({"round": r, "path": way, **summary})
    finally:
        for connections in ways.values():
            await connections.aclose()
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent streams")
    parser.add_argument("--output-tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (after warm-up)")
    parser.add_argument("--router", default="cache-aware", help="the router (default: cache-aware)")
    parser.add_argument(
        "--client", choices=["raw", "httpx"], default="raw", help="the load generator"
    )
    args = parser.parse_args(argv)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    serve_port, router_port = free_port(), free_port()
    direct, routed = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{router_port}"
    slog = tmp / f"kvflow-router-overhead-{serve_port}.log"
    sets = _sets(ZERO_COST)
    server = start(["serve", "--engine", "sim", "--peer-port", "0", *sets], serve_port, slog)
    router = None
    try:
        wait_until_serving(direct, server, slog)
        rlog = tmp / f"kvflow-router-overhead-{router_port}.log"
        router_args = ["router", "--instance", direct, "--router", args.router, *sets]
        router = start(router_args, router_port, rlog)
        wait_until_serving(routed, router, rlog)
        lines = anyio.run(run, args, direct, routed, backend="asyncio", backend_options=UVLOOP)
        forwarding_ms = forwarding_quantiles(routed)
    finally:
        for proc in (router, server):
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    common = {
        "benchmark": "router_overhead",
        "router": args.router,
        "client": args.client,
        "clients": args.clients,
        "output_tokens": args.output_tokens,
        "prompt_tokens": args.prompt_tokens,
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
    }
    for line in lines:
        print(json.dumps({**common, **line}))

    def median(path: str, key: str) -> float:
        return statistics.median(line[key] for line in lines if line["path"] == path)

    summary: dict[str, Any] = {"path": "median over rounds"}
    for path in ("straight", "router"):
        summary[f"{path}_tokens_per_s"] = median(path, "tokens_per_s")
        summary[f"{path}_ttft_p50_ms"] = median(path, "ttft_p50_ms")
    # Paired per round (the two paths ran back to back): the load other programs put
    # on the machine drifts between rounds far more than within one.
    by_round = {(line["round"], line["path"]): line for line in lines}
    rounds = sorted({line["round"] for line in lines})

    def paired(key: str, combine: Callable[[float, float], float]) -> float:
        return statistics.median(
            combine(by_round[(r, "router")][key], by_round[(r, "straight")][key]) for r in rounds
        )

    summary["tokens_per_s_ratio"] = paired("tokens_per_s", lambda a, b: a / b)
    for q in ("p50", "p99"):
        summary[f"added_ttft_{q}_ms"] = paired(f"ttft_{q}_ms", lambda a, b: a - b)
    summary.update(forwarding_ms)
    print(json.dumps({**common, **summary}))


if __name__ == "__main__":
    main()
