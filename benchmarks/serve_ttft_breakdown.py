"""Where the TTFT the HTTP path adds goes: `benchmarks/serve_overhead.py`'s load (its
raw load generator, `--clients` concurrent streams, zero-cost latency model) against a
`kvflow serve --engine sim` process instrumented from outside (an ASGI wrapper around
the app and a wrapped `OpenAIServing.submit`: nothing in kvflow changes), then the
same requests through an in-process `AsyncEngine`. Client and server timestamps are on
one clock (`time.perf_counter`, CLOCK_MONOTONIC, shared by the processes).

Each request's time to its first token splits into, in ms:

- `send->app`: its bytes reach the app (kernel, the server's loop busy elsewhere,
  uvicorn's HTTP parsing, a task for the request);
- `app->submit`: the body read, JSON, validation, the engine `Request`;
- `submit->scheduled`: waiting for a step that takes it (the engine's `queue_s`);
- `scheduled->token`: that step, to its commit (first token routed);
- `token->handler`: the handler resumes with the first output;
- `handler->write`: the response's start and first chunk reach uvicorn's `send`;
- `write->client`: the client reads and parses it;

in-process only the engine's two (`submit->scheduled`, `scheduled->token`) and
`token->consumer`. And, not stretched by other processes taking the cores, the CPU
the event loop's thread spent from the round's first request to each request's first
token (`loop_cpu_to_first_token_ms`: the server's from the first request's arrival to
this one's first write; in-process, the client's from the round's start), and the
writes per response (fewer than its tokens when a stream fell behind). Prints one
JSON line per round with the medians over requests, then the medians over rounds:

    python benchmarks/serve_ttft_breakdown.py [--clients 64] [--output-tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import (
    UVLOOP,
    ZERO_COST,
    free_port,
    local_round,
    prompts,
    raw_round,
    wait_until_serving,
)

from kvflow.engine import AsyncEngine
from kvflow.serve.host import ServeOptions, load
from kvflow.traces.endpoint_client import client_maker, first_model

HTTP_PARTS = (
    "send->app",
    "app->submit",
    "submit->scheduled",
    "scheduled->token",
    "token->handler",
    "handler->write",
    "write->client",
)
LOCAL_PARTS = ("submit->scheduled", "scheduled->token", "token->consumer")


def serve_instrumented(port: int, out: Path, settings: dict[str, Any]) -> None:
    """Run `kvflow serve --engine sim` with `settings`, each completion request's
    timestamps recorded; write them to `out` as JSON when the server stops."""
    from kvflow.serve import server as server_module
    from kvflow.serve.serving import Generation, OpenAIServing

    records: list[dict[str, float]] = []
    current: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("record")
    build_app = server_module.build_app

    def build(host: Any) -> Any:
        app = build_app(host)

        async def traced(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] != "/v1/completions":
                await app(scope, receive, send)
                return
            record = {"app": time.perf_counter(), "app_cpu": time.thread_time()}
            records.append(record)
            current.set(record)

            async def timed_send(message: Any) -> None:
                body = message["type"] == "http.response.body" and message.get("body")
                if body:
                    record["num_writes"] = record.get("num_writes", 0) + 1
                if body and "write" not in record:
                    record["write"] = time.perf_counter()
                    record["write_cpu"] = time.thread_time()
                await send(message)

            await app(scope, receive, timed_send)

        return traced

    submit = OpenAIServing.submit

    async def timed_submit(self: OpenAIServing, request: Any) -> Generation:
        record = current.get()
        record["key"] = request.prompt_token_ids[0]
        record["submit"] = time.perf_counter()
        gen = await submit(self, request)
        record["handler"] = time.perf_counter()
        record["scheduled"] = record["submit"] + (gen.first.queue_s or 0.0)
        record["token"] = record["submit"] + (gen.first.ttft_s or 0.0)
        return gen

    server_module.build_app = build  # type: ignore[assignment]
    OpenAIServing.submit = timed_submit  # type: ignore[method-assign]
    server_module.serve(ServeOptions(engine="sim", settings=settings), port=port)
    out.write_text(json.dumps(records))


def http_parts(client: dict[str, float], server: dict[str, float]) -> dict[str, float]:
    marks = [client["sent"], server["app"], server["submit"], server["scheduled"]]
    marks += [server["token"], server["handler"], server["write"], client["first"]]
    return {part: (b - a) * 1e3 for part, a, b in zip(HTTP_PARTS, marks, marks[1:], strict=False)}


def local_parts(timing: dict[str, float]) -> dict[str, float]:
    token = timing["sent"] + timing["ttft_s"]
    return {
        "submit->scheduled": timing["queue_s"] * 1e3,
        "scheduled->token": (timing["ttft_s"] - timing["queue_s"]) * 1e3,
        "token->consumer": (timing["first"] - token) * 1e3,
    }


def medians(rows: Sequence[dict[str, float]], parts: Sequence[str]) -> dict[str, float]:
    return {p: round(statistics.median(r[p] for r in rows), 3) for p in parts}


async def run(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    """The rounds' client timings (the server's come from its file afterwards)."""
    loaded = load(ServeOptions(engine="sim", settings=args.settings))
    engine = AsyncEngine(loaded.config, loaded.runner, "fcfs", max_num_pending=4096)
    parsed = httpx.URL(url)
    address = (parsed.host, parsed.port or 80)
    async with client_maker(url, timeout_s=10)() as client:
        model = await first_model(client, url)
    rounds = []
    async with engine:
        for r in range(args.rounds + 1):  # round 0 warms up
            batch = prompts(r, args.clients, args.prompt_tokens)
            raw = await raw_round(address, model, batch, args.output_tokens)
            batch = prompts(r + 1000, args.clients, args.prompt_tokens)
            local = await local_round(engine, r, batch, args.output_tokens)
            rounds.append({"http": raw.timings, "local": local.timings, "round": r})
    return rounds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for both engines (default: the zero-cost latency model; e.g. "
        "sim.fixed_ms=100 for steps of 100 ms)",
    )
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.settings = dict(ZERO_COST)
    for item in args.set:
        key, _, value = item.partition("=")
        args.settings[key] = json.loads(value)
    if args.serve:
        port, out, settings = args.serve
        serve_instrumented(int(port), Path(out), json.loads(settings))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "server.json", Path(tmp) / "server.log"
        with log.open("wb") as sink:
            server = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    str(port),
                    str(out),
                    json.dumps(args.settings),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_serving(url, server, log)
            rounds = anyio.run(run, args, url, backend="asyncio", backend_options=UVLOOP)
        finally:
            server.terminate()
            server.wait(60)
        records = {int(r["key"]): r for r in json.loads(out.read_text())}
    common = {"benchmark": "serve_ttft_breakdown", "clients": args.clients, "cpus": os.cpu_count()}
    common["settings"] = args.settings
    lines = []
    for one in rounds[1:]:
        http = [http_parts(t, records[k]) for k, t in one["http"].items()]
        local = [local_parts(t) for t in one["local"].values()]
        ttft = statistics.median((t["first"] - t["sent"]) * 1e3 for t in one["http"].values())
        ttft_local = statistics.median(
            (t["first"] - t["sent"]) * 1e3 for t in one["local"].values()
        )
        round_records = [records[k] for k in one["http"]]
        start_cpu = min(r["app_cpu"] for r in round_records)
        http_cpu = statistics.median((r["write_cpu"] - start_cpu) * 1e3 for r in round_records)
        local_cpu = statistics.median(t["first_cpu"] * 1e3 for t in one["local"].values())
        line = {"round": one["round"], "http_ttft_p50_ms": round(ttft, 3)}
        line["writes_per_request"] = statistics.mean(r["num_writes"] for r in round_records)
        line |= {"loop_cpu_to_first_token_ms": {"http": round(http_cpu, 3)}}
        line["loop_cpu_to_first_token_ms"]["in_process"] = round(local_cpu, 3)
        line |= {"in_process_ttft_p50_ms": round(ttft_local, 3)}
        line |= {"http": medians(http, HTTP_PARTS), "in_process": medians(local, LOCAL_PARTS)}
        lines.append(line)
        print(json.dumps({**common, **line}))
    summary: dict[str, Any] = {"path": "median over rounds"}
    for key in ("http_ttft_p50_ms", "in_process_ttft_p50_ms"):
        summary[key] = round(statistics.median(line[key] for line in lines), 3)
    for side, parts in (("http", HTTP_PARTS), ("in_process", LOCAL_PARTS)):
        summary[side] = {p: round(statistics.median(x[side][p] for x in lines), 3) for p in parts}
    summary["writes_per_request"] = statistics.median(x["writes_per_request"] for x in lines)
    summary["loop_cpu_to_first_token_ms"] = {
        side: round(statistics.median(x["loop_cpu_to_first_token_ms"][side] for x in lines), 3)
        for side in ("http", "in_process")
    }
    print(json.dumps({**common, **summary, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
