"""A real `kvflow serve` process on a free loopback port, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of `url`/metrics by (name, labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`; 0 for a
    labelled counter (`*_total`) that has no such sample yet.

    Raises:
        KeyError: no such sample otherwise (a misspelt gauge must not read as 0).
    """
    wanted = set(labels.items())
    values = [v for (n, ls), v in metrics(url).items() if n == name and wanted <= ls]
    if not values and not name.endswith("_total"):
        raise KeyError(f"{url}/metrics has no sample {name} with labels {labels}")
    return sum(values)


@contextmanager
def app_in_thread(app: Any) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free loopback port in a thread of this
    process; yields its base URL (`http://127.0.0.1:PORT`) once it listens."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class ServerProcess:
    """`python -m kvflow serve --port P ARGS` (or `python PROGRAM --port P ARGS`), its
    output in `log_path`; P is a free port unless `port` is given (to restart a server
    where it was).

    Use as a context manager: entering waits until /health answers 200 (bounded),
    leaving kills the process if it is still running.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        startup_timeout_s: float = 180.0,
        program: Sequence[str] = ("-m", "kvflow", "serve"),
        port: int | None = None,
    ):
        self.port = free_port() if port is None else port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        command = [sys.executable, *program, "--port", str(self.port), *args]
        self.health_seen: list[tuple[int, str]] = []
        """(status, body) of each /health answer while waiting for the server."""
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> ServerProcess:
        self.wait_healthy()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvflow serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.base_url}/health", timeout=2.0)
            except httpx.TransportError:
                pass
            else:
                self.health_seen.append((health.status_code, health.text))
                if health.status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"kvflow serve not healthy in {self.startup_timeout_s} s:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return metrics(self.base_url)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.base_url, name, **labels)

    def wait_for_metric(
        self, name: str, value: float, timeout_s: float = 20.0, **labels: str
    ) -> None:
        """Poll /metrics until `name` reads `value` (bounded)."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            seen = self.metric(name, **labels)
            if seen == value:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} stayed {seen}, want {value}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then the exit status (the process is killed if it outlives the wait)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@contextmanager
def serving(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """`servers` once each answers /health, killed at the end: each process started when
    its `ServerProcess` was made, so their start-ups overlap (where `with A as a, B as b`
    starts B only once A is healthy)."""
    try:
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.kill()


__all__ = ["ServerProcess", "free_port", "metric", "metrics", "serving"]
