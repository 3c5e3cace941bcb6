"""Soak: many requests through a real `kvflow serve --engine sim` process, some clients
leaving mid-stream and some sending bad requests; then check that nothing was lost and
nothing leaked.

The server runs in its own process with a zero-cost latency model by default (steps
return at once: real time, accelerated), so the run measures the serving path itself.
This process is the client: `--clients` concurrent httpx clients send `--requests`
requests, each drawn from a seeded generator: completions (token ids sharing a few
prefixes) or chat, streamed or not; `--disconnect-fraction` of them close their
connection at a random point (after a random number of events, or a few ms into a
non-streamed request); `--bad-fraction` are bad (invalid JSON, unknown model or field,
empty prompt, negative token id, absurd values), each expecting a 4xx.

Checks, in the last line (`"event": "report"`), each true or false:

- `accounted`: `/metrics` counts every request sent exactly once:
  `request_success` (finished, any reason, `abort` for those that left) +
  `request_rejected` (by status; 499: left before its body arrived) = sent; those
  rejected with a 4xx other than 499 are exactly the bad ones; none failed;
- `outputs_whole`: every request that stayed got status 200 and all its tokens
  (`usage.completion_tokens` = `max_tokens`), and every bad one a 4xx;
- `rss_flat`: the server's VmRSS after warm-up (the first `--warmup-fraction` of
  requests) varies less than `--rss-tolerance` (max / min - 1);
- `threads_flat`: the server never has more threads after warm-up than during it;
- `at_rest`: once the clients are done, nothing is held: no request in flight, queued
  or running, no device block referenced, and as many asyncio tasks as before the load;
- `clean_exit`: SIGTERM drains and the process exits 0, its log free of tracebacks and
  of tasks destroyed while pending;
- `ttft_steady`: p99 TTFT (client-side, streamed requests) of the last quarter of the
  run is at most `--ttft-tolerance` times the first quarter's (a slow leak shows here).

Prints one JSON line per tenth of the run (throughput, RSS, threads, TTFT of that tenth),
then the report. Exits 1 when a check fails.

    python benchmarks/soak.py [--requests 100000] [--clients 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "kvflow-sim"
MAX_MODEL_LEN = 4096
BAD_BODIES: tuple[tuple[str, bytes | dict[str, Any]], ...] = (
    ("not json", b'{"model": "kvflow-sim", "prompt": '),
    ("unknown model", {"model": "nope", "prompt": [300, 301]}),
    ("empty prompt", {"model": MODEL, "prompt": []}),
    ("negative token id", {"model": MODEL, "prompt": [300, -5]}),
    ("unknown field", {"model": MODEL, "prompt": [300], "bogus": 1}),
    ("max_tokens past max_model_len", {"model": MODEL, "prompt": [300], "max_tokens": 10**7}),
    ("negative temperature", {"model": MODEL, "prompt": [300], "temperature": -1}),
    ("n=2", {"model": MODEL, "prompt": [300], "n": 2}),
)
"""Bad request bodies (for /v1/completions), each answered with a 4xx."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Outcome:
    """What one request's client saw."""

    index: int
    kind: str
    """ok, disconnect or bad."""
    status: int | None = None
    ttft_s: float | None = None
    complete: bool = False
    """ok: every token arrived; bad: a 4xx with an error body; disconnect: always."""


@dataclass
class Run:
    args: argparse.Namespace
    url: str
    pid: int
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[tuple[int, int, int]] = field(default_factory=list)
    """(requests done, VmRSS KiB, threads) of the server, every `--sample-s`."""
    next_index: int = 0
    started: float = 0.0
    load_s: float = 0.0
    """From the first request sent to the last one's end."""


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, threads) of process `pid`."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def scrape(url: str) -> dict[str, float]:
    """/metrics as `name{label=value,...}` -> value, labels sorted (model_name left out)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(name + "{"))


def request_body(rng: random.Random, prefixes: list[list[int]]) -> tuple[str, dict[str, Any]]:
    """(path, body) of a good request."""
    max_tokens = rng.randint(1, 48)
    if rng.random() < 0.75:
        prompt = rng.choice(prefixes)[: rng.randint(0, 64)]
        prompt += [rng.randrange(256, 32000) for _ in range(rng.randint(1, 128))]
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        return "/v1/completions", body
    words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(rng.randint(1, 96)))
    messages = [{"role": "user", "content": words}]
    return "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": max_tokens}


async def one(run: Run, client: httpx.AsyncClient, index: int, prefixes: list[list[int]]) -> None:
    args = run.args
    rng = random.Random(args.seed * 1_000_003 + index)
    draw = rng.random()
    kind = "bad" if draw < args.bad_fraction else "ok"
    if args.bad_fraction <= draw < args.bad_fraction + args.disconnect_fraction:
        kind = "disconnect"
    outcome = Outcome(index, kind)
    run.outcomes.append(outcome)
    if kind == "bad":
        _, bad = BAD_BODIES[rng.randrange(len(BAD_BODIES))]
        content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        headers = {"content-type": "application/json"}
        resp = await client.post("/v1/completions", content=content, headers=headers)
        outcome.status = resp.status_code
        outcome.complete = 400 <= resp.status_code < 500 and "message" in resp.json()["error"]
        return
    path, body = request_body(rng, prefixes)
    stream = rng.random() < 0.8
    if kind == "disconnect" and not stream:
        await send_and_leave(run.url, path, body, rng.uniform(0, 0.01))
        outcome.complete = True
        return
    leave_after = rng.randint(0, body["max_tokens"]) if kind == "disconnect" else None
    if not stream:
        resp = await client.post(path, json=body)
        outcome.status = resp.status_code
        num_tokens = resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else -1
        outcome.complete = num_tokens == body["max_tokens"]
        return
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    num_events = 0
    async with client.stream("POST", path, json=body) as resp:
        outcome.status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if num_events == leave_after:
                outcome.complete = True
                return  # leaving the block closes the connection mid-stream
            if num_events == 0:
                outcome.ttft_s = time.perf_counter() - sent
            num_events += 1
            data = line[6:]
            if data != "[DONE]":
                usage = json.loads(data).get("usage")
                if usage is not None:
                    outcome.complete = usage["completion_tokens"] == body["max_tokens"]
    if kind == "disconnect":
        outcome.complete = True  # it stayed to the end: finished, not aborted


async def send_and_leave(url: str, path: str, body: dict[str, Any], after_s: float) -> None:
    """Write a whole request on a new connection, wait `after_s`, and close it (the
    request surely reached the server, unlike a request cancelled inside httpx)."""
    host, port = url.removeprefix("http://").split(":")
    content = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    )
    async with await anyio.connect_tcp(host, int(port)) as sock:
        await sock.send(head.encode() + content)
        await anyio.sleep(after_s)


async def client_loop(run: Run, prefixes: list[list[int]]) -> None:
    limits = httpx.Limits(max_connections=run.args.clients, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=run.url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while run.next_index < run.args.requests:
                index = run.next_index
                run.next_index += 1
                await one(run, client, index, prefixes)

        async with anyio.create_task_group() as tg:
            for _ in range(run.args.clients):
                tg.start_soon(worker)


async def sampler(run: Run, done: anyio.Event) -> None:
    tenth = max(1, run.args.requests // 10)
    reported = 0
    while not done.is_set():
        rss_kib, threads = proc_status(run.pid)
        num_done = len(run.outcomes)
        run.samples.append((num_done, rss_kib, threads))
        if num_done >= (reported + 1) * tenth and reported < 10:
            reported = num_done // tenth
            window = [o.ttft_s for o in run.outcomes[-tenth:] if o.ttft_s is not None]
            line = {
                "event": "window",
                "requests_done": num_done,
                "requests_per_s": round(num_done / (time.monotonic() - run.started), 1),
                "rss_mib": round(rss_kib / 1024, 1),
                "threads": threads,
                "ttft_p50_ms": round(percentile(window, 50) * 1e3, 2),
                "ttft_p99_ms": round(percentile(window, 99) * 1e3, 2),
            }
            print(json.dumps(line), flush=True)
        with anyio.move_on_after(run.args.sample_s):
            await done.wait()


async def drive(run: Run) -> None:
    rng = random.Random(run.args.seed)
    prefixes = [[rng.randrange(256, 32000) for _ in range(64)] for _ in range(8)]
    done = anyio.Event()
    run.started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler, run, done)
        await client_loop(run, prefixes)
        run.load_s = time.monotonic() - run.started
        done.set()


def wait_at_rest(url: str, num_sent: int, timeout_s: float = 30.0) -> dict[str, float]:
    """/metrics once every request is counted and nothing is held (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(url)
        counted = total(metrics, "kvflow:request_success_total") + total(
            metrics, "kvflow:request_rejected_total"
        )
        held = sum(
            total(metrics, name)
            for name in (
                "kvflow:server_requests_in_flight",
                "kvflow:num_requests_running",
                "kvflow:num_requests_waiting",
            )
        )
        if (counted == num_sent and held == 0) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def report(run: Run, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    args = run.args
    outcomes = sorted(run.outcomes, key=lambda o: o.index)
    num_sent = len(outcomes)
    by_kind = {k: [o for o in outcomes if o.kind == k] for k in ("ok", "disconnect", "bad")}
    finished = {
        k.split("finished_reason=")[1].rstrip("}"): v
        for k, v in after.items()
        if k.startswith("kvflow:request_success_total{")
    }
    rejected = {
        k.split("status=")[1].rstrip("}"): v
        for k, v in after.items()
        if k.startswith("kvflow:request_rejected_total{")
    }
    num_refused = sum(v for status, v in rejected.items() if status != "499")
    warm = [(r, t) for done, r, t in run.samples if done >= args.warmup_fraction * num_sent]
    threads_warming = [t for done, _, t in run.samples if done < args.warmup_fraction * num_sent]
    rss = [r for r, _ in warm] or [0]
    quarter = max(1, num_sent // 4)
    ttft_q = [
        [o.ttft_s for o in outcomes[q * quarter : (q + 1) * quarter] if o.ttft_s is not None]
        for q in range(4)
    ]
    p99 = [percentile(t, 99) * 1e3 for t in ttft_q]
    checks = {
        "accounted": sum(finished.values()) + sum(rejected.values()) == num_sent
        and num_refused == len(by_kind["bad"])
        and finished.get("error", 0) == 0,
        "outputs_whole": all(o.complete for o in outcomes)
        and all(o.status == 200 for o in by_kind["ok"]),
        "rss_flat": max(rss) / min(rss) - 1 <= args.rss_tolerance,
        "threads_flat": max((t for _, t in warm), default=0) <= max(threads_warming, default=0)
        or not threads_warming,
        "at_rest": total(after, "kvflow:server_requests_in_flight") == 0
        and total(after, "kvflow:num_requests_running") == 0
        and total(after, "kvflow:num_requests_waiting") == 0
        and after.get("kvflow:kv_blocks_used{tier=device}", 0) == 0
        and total(after, "kvflow:server_tasks") == total(before, "kvflow:server_tasks"),
        "ttft_steady": p99[3] <= args.ttft_tolerance * p99[0],
    }
    return {
        "event": "report",
        "requests_sent": num_sent,
        "requests_by_kind": {k: len(v) for k, v in by_kind.items()},
        "server_finished_by_reason": finished,
        "server_rejected_by_status": rejected,
        "load_seconds": round(run.load_s, 1),
        "requests_per_s": round(num_sent / run.load_s, 1) if run.load_s else None,
        "rss_mib_after_warmup": [round(min(rss) / 1024, 1), round(max(rss) / 1024, 1)],
        "rss_drift": round(max(rss) / min(rss) - 1, 4),
        "threads_after_warmup": [min(t for _, t in warm), max(t for _, t in warm)] if warm else [],
        "server_tasks_before_after": [
            total(before, "kvflow:server_tasks"),
            total(after, "kvflow:server_tasks"),
        ],
        "ttft_p99_ms_by_quarter": [round(v, 2) for v in p99],
        "ttft_p50_ms_by_quarter": [round(percentile(t, 50) * 1e3, 2) for t in ttft_q],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "checks": checks,
    }


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    settings = {
        "sim.preset": "null",
        "sim.fixed_ms": args.step_ms,
        "scheduler.max_model_len": MAX_MODEL_LEN,
    }
    command = [sys.executable, "-m", "kvflow", "serve", "--engine", "sim", "--port", str(port)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kvflow serve exited {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SystemExit(f"kvflow serve not healthy in 120 s:\n{log.read_text()}")


def stop_server(server: subprocess.Popen[bytes], log: Path) -> bool:
    """SIGTERM; whether it exited 0 within 60 s with a clean log."""
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)
        return False
    text = log.read_text(errors="replace")
    return code == 0 and "Traceback" not in text and "Task was destroyed" not in text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--requests", type=int, default=100_000, help="requests to send (default: 100000)")
    add("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    add("--disconnect-fraction", type=float, default=0.10, help="clients that leave early")
    add("--bad-fraction", type=float, default=0.01, help="bad requests (default: 0.01)")
    add("--step-ms", type=float, default=0.0, help="simulated step time (default: 0)")
    add("--seed", type=int, default=0, help="seed of the requests (default: 0)")
    add("--warmup-fraction", type=float, default=0.1, help="requests before RSS is judged")
    add("--rss-tolerance", type=float, default=0.10, help="max/min RSS after warm-up, minus 1")
    add("--ttft-tolerance", type=float, default=1.5, help="last/first quarter p99 TTFT")
    add("--sample-s", type=float, default=0.25, help="seconds between RSS samples")
    add("--log", type=Path, help="server log (default: a temporary file)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.log or Path(tempfile.mkdtemp(prefix="kvflow-soak-")) / "serve.log"
    server = start_server(args, port, log)
    try:
        before = scrape(url)
        run = Run(args, url, server.pid)
        anyio.run(drive, run, backend="asyncio", backend_options={"use_uvloop": True})
        after = wait_at_rest(url, len(run.outcomes))
        line = report(run, before, after)
    finally:
        clean = stop_server(server, log) if server.poll() is None else False
    line["checks"]["clean_exit"] = clean
    line["server_log"] = str(log)
    print(json.dumps(line), flush=True)
    return 0 if all(line["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
