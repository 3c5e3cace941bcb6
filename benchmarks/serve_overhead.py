"""What the HTTP path costs: `kvflow serve --engine sim` with a zero-cost latency model
against the same simulated runner and config driven in-process through `AsyncEngine`.

The server runs in its own process (`python -m kvflow serve`); this process is the
client. Each round sends the same `--clients` concurrent requests (`--prompt-tokens`
token ids each, new ids every round so nothing hits the prefix cache, `--output-tokens`
outputs with `ignore_eos`) three ways, one after the other:

- `http`: a minimal load generator, one keep-alive connection per client (anyio
  sockets; the HTTP/1.1 request written as bytes, the chunked SSE response scanned for
  `data:` events, tokens counted from `usage.completion_tokens`). It does as little per
  streamed chunk as a client can, so it measures the server, not the client;
- `http, replay client`: the same requests through `kvflow replay --endpoint`'s client
  (httpx, `kvflow.traces.endpoint_client`), whose per-chunk cost is far higher;
- `in-process`: an `AsyncEngine` built by the server's own loader
  (`kvflow.serve.host.load`), so runner, config and policy are the same.

Per way: streamed output tokens per second (all tokens / first send to last token) and
TTFT (send to the first token). The TTFT the HTTP path adds is `http`'s p50 (p99) minus
`in-process`'s, in the same round. And CPU per streamed token, which other processes
on the cores do not stretch: the server process's (user + system, from /proc, over the
`http` way) and this process's over the `in-process` way. Round 0 warms up
(connections, imports) and is not reported. Prints one JSON line per round and way,
then one with the medians over rounds:

    python benchmarks/serve_overhead.py [--clients 64] [--output-tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import SocketStream

from kvflow.engine import AsyncEngine
from kvflow.request import Request
from kvflow.serve.host import ServeOptions, load
from kvflow.traces.endpoint_client import (
    Connections,
    client_maker,
    first_model,
    stream_request,
)

ZERO_COST = {
    "sim.fixed_ms": 0,
    "sim.prefill_token_us": 0,
    "sim.decode_seq_us": 0,
    "sim.kv_token_ns": 0,
}
"""The latency model with every coefficient 0: a step returns as soon as it is made."""
UVLOOP = {"use_uvloop": True}


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far, from /proc (Linux;
    None elsewhere or without a pid)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prompts(round_index: int, num_clients: int, prompt_tokens: int) -> list[list[int]]:
    """Distinct prompts per round and client (ids in the sim server's vocabulary)."""
    base = 1000 + round_index * num_clients * prompt_tokens
    return [
        [256 + (base + c * prompt_tokens + j) % 31000 for j in range(prompt_tokens)]
        for c in range(num_clients)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


class Side:
    """One side's figures of one round."""

    def __init__(self) -> None:
        self.ttft_s: list[float] = []
        self.timings: dict[int, dict[str, float]] = {}
        """Per request (keyed by its prompt's first id): when it was sent and its first
        token seen, on `time.perf_counter`, and the engine's `queue_s`/`ttft_s` where
        known (in-process)."""
        self.num_tokens = 0
        self.start = 0.0
        self.start_cpu = 0.0
        """`time.thread_time()` at the start (in-process: the loop's CPU from there)."""
        self.end = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "tokens_per_s": self.num_tokens / (self.end - self.start),
            "ttft_p50_ms": percentile(self.ttft_s, 50) * 1e3,
            "ttft_p99_ms": percentile(self.ttft_s, 99) * 1e3,
            "num_tokens": self.num_tokens,
        }


async def http_round(
    connections: Connections, model: str, batch: list[list[int]], output_tokens: int
) -> Side:
    side = Side()

    async def one(prompt: list[int]) -> None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": output_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        async with connections.client() as client:
            streamed = await stream_request(client, "/v1/completions", body, time.perf_counter)
        side.end = max(side.end, time.perf_counter())
        num_tokens = (streamed.usage or {}).get("completion_tokens")
        if num_tokens != output_tokens:
            raise RuntimeError(f"a stream ended with {num_tokens} of {output_tokens} tokens")
        side.ttft_s.append(streamed.token_times[0] - sent)
        side.num_tokens += num_tokens

    side.start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt in batch:
            tg.start_soon(one, prompt)
    return side


async def raw_round(
    address: tuple[str, int], model: str, batch: list[list[int]], output_tokens: int
) -> Side:
    """The load generator's round. Its connections open before the clock starts (idle
    keep-alive connections would be closed by the server between rounds)."""
    side = Side()
    streams = [await anyio.connect_tcp(*address) for _ in batch]

    async def one(stream: SocketStream, prompt: list[int]) -> None:
        body = json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        head = (
            "POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        sent = time.perf_counter()
        await stream.send(head.encode() + body)
        first: float | None = None
        received = bytearray()
        while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                raise RuntimeError(f"the server closed after {bytes(received[:300])!r}") from None
            if first is None and b'"text":"' in data:
                first = time.perf_counter()
            received += data
        side.end = max(side.end, time.perf_counter())
        if not received.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the server answered {bytes(received[:300])!r}")
        usage = re.search(rb'"completion_tokens":(\d+)', received)
        num_tokens = int(usage.group(1)) if usage else 0
        if first is None or num_tokens != output_tokens:
            raise RuntimeError(f"a stream ended with {num_tokens} of {output_tokens} tokens")
        side.ttft_s.append(first - sent)
        side.timings[prompt[0]] = {"sent": sent, "first": first}
        side.num_tokens += num_tokens

    side.start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for stream, prompt in zip(streams, batch, strict=True):
            tg.start_soon(one, stream, prompt)
    for stream in streams:
        await stream.aclose()
    return side


async def local_round(
    engine: AsyncEngine, round_index: int, batch: list[list[int]], output_tokens: int
) -> Side:
    side = Side()

    async def one(i: int, prompt: list[int]) -> None:
        request = Request(f"r{round_index}-{i}", tuple(prompt), output_tokens)
        sent = time.perf_counter()
        first: float | None = None
        num_tokens = 0
        async for out in engine.generate(request):
            if first is None and out.new_token_ids:
                first = time.perf_counter()
                engine_times = {"queue_s": out.queue_s or 0.0, "ttft_s": out.ttft_s or 0.0}
                engine_times["first_cpu"] = time.thread_time() - side.start_cpu
            num_tokens = out.num_output_tokens
        side.end = max(side.end, time.perf_counter())
        if first is None or num_tokens != output_tokens:
            raise RuntimeError(f"a request ended with {num_tokens} of {output_tokens} tokens")
        side.ttft_s.append(first - sent)
        side.timings[prompt[0]] = {"sent": sent, "first": first, **engine_times}
        side.num_tokens += num_tokens

    side.start = time.perf_counter()
    side.start_cpu = time.thread_time()
    async with anyio.create_task_group() as tg:
        for i, prompt in enumerate(batch):
            tg.start_soon(one, i, prompt)
    return side


def start_server(port: int, settings: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    argv = [sys.executable, "-m", "kvflow", "serve", "--engine", "sim", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen([*argv, *sets], stdout=out, stderr=subprocess.STDOUT)


def wait_until_serving(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server was not serving after 60 s: {log.read_text()}")


async def run(
    args: argparse.Namespace, url: str, server_pid: int | None = None
) -> list[dict[str, Any]]:
    loaded = load(ServeOptions(engine="sim", settings=dict(ZERO_COST)))
    engine = AsyncEngine(loaded.config, loaded.runner, "fcfs", max_num_pending=4096)
    connections = Connections(client_maker(url, timeout_s=60), args.clients)
    parsed = httpx.URL(url)
    address = (parsed.host, parsed.port or 80)
    lines: list[dict[str, Any]] = []
    try:
        async with engine:
            async with connections.client() as client:
                model = await first_model(client, url)
            for r in range(args.rounds + 1):  # round 0 warms up
                batch = prompts(r, args.clients, args.prompt_tokens)
                cpu_before = process_cpu_s(server_pid)
                raw = await raw_round(address, model, batch, args.output_tokens)
                cpu_after = process_cpu_s(server_pid)
                batch = prompts(r + 1000, args.clients, args.prompt_tokens)
                replay = await http_round(connections, model, batch, args.output_tokens)
                local_cpu = time.process_time()
                local = await local_round(engine, r, batch, args.output_tokens)
                local_cpu = time.process_time() - local_cpu
                if r == 0:
                    continue
                h, loc = raw.summary(), local.summary()
                if cpu_before is not None and cpu_after is not None:
                    h["server_cpu_us_per_token"] = (cpu_after - cpu_before) / raw.num_tokens * 1e6
                loc["cpu_us_per_token"] = local_cpu / local.num_tokens * 1e6
                lines.append({"round": r, "path": "http", **h})
                lines.append({"round": r, "path": "http, replay client", **replay.summary()})
                lines.append({"round": r, "path": "in-process", **loc})
                lines.append(
                    {
                        "round": r,
                        "path": "http minus in-process",
                        "added_ttft_p50_ms": h["ttft_p50_ms"] - loc["ttft_p50_ms"],
                        "added_ttft_p99_ms": h["ttft_p99_ms"] - loc["ttft_p99_ms"],
                    }
                )
    finally:
        await connections.aclose()
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent streams")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after warm-up)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument(
        "--url",
        help="use this running server instead of starting one (for profiling it; start it "
        "with the zero-cost settings: " + " ".join(f"--set {k}=0" for k in ZERO_COST) + ")",
    )
    args = parser.parse_args(argv)
    if args.url:
        lines = anyio.run(run, args, args.url, backend="asyncio", backend_options=UVLOOP)
    else:
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvflow-serve-overhead-{port}.log"
        server = start_server(port, ZERO_COST, log)
        try:
            wait_until_serving(url, server, log)
            lines = anyio.run(run, args, url, server.pid, backend="asyncio", backend_options=UVLOOP)
        finally:
            server.terminate()
            server.wait(60)
    common = {
        "benchmark": "serve_overhead",
        "clients": args.clients,
        "output_tokens": args.output_tokens,
        "prompt_tokens": args.prompt_tokens,
        "cpus": os.cpu_count(),
    }
    for line in lines:
        print(json.dumps({**common, **line}))
    summary: dict[str, Any] = {"path": "median over rounds"}
    for path, key, name in (
        ("http", "tokens_per_s", "http_tokens_per_s"),
        ("http, replay client", "tokens_per_s", "http_replay_client_tokens_per_s"),
        ("in-process", "tokens_per_s", "in_process_tokens_per_s"),
        ("http", "ttft_p50_ms", "http_ttft_p50_ms"),
        ("in-process", "ttft_p50_ms", "in_process_ttft_p50_ms"),
        ("http minus in-process", "added_ttft_p50_ms", "added_ttft_p50_ms"),
        ("http minus in-process", "added_ttft_p99_ms", "added_ttft_p99_ms"),
        ("http", "server_cpu_us_per_token", "http_server_cpu_us_per_token"),
        ("in-process", "cpu_us_per_token", "in_process_cpu_us_per_token"),
    ):
        values = [line[key] for line in lines if line["path"] == path and key in line]
        summary[name] = statistics.median(values) if values else None
    print(json.dumps({**common, **summary}))


if __name__ == "__main__":
    main()
