"""A `kvflow cluster up` cluster for the tests: started by the real CLI in a
subprocess, stopped with `kvflow cluster down`, and every pid it lists killed in the
end whatever happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvflow.cluster.launcher import INSTANCE_ROLES, ProcessId, child_env, is_ours
from tests.serve_process import free_port, metric, metrics

# Steps of 2 ms in real time, and prefill that costs (10 us a token): a cached prefix
# makes an instance the cache-aware router's choice. Block events every 10 ms.
SIM = [
    "--set", "sim.preset=null", "--set", "sim.fixed_ms=2", "--set", "sim.prefill_token_us=10",
    "--set", "peer.event_interval_s=0.01",
]  # fmt: skip


def kvflow(*args: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvflow", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=child_env(),  # this checkout's kvflow, as `up` gives its children
        check=False,
    )


@dataclass
class Cluster:
    state_dir: Path
    url: str
    state: dict[str, Any]

    @property
    def pids(self) -> list[int]:
        return [p["pid"] for p in self.state["procs"]]

    @property
    def instances(self) -> list[dict[str, Any]]:
        return [p for p in self.state["procs"] if p["role"] in INSTANCE_ROLES]

    def router_metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return metrics(self.url)


@contextmanager
def cluster(
    state_dir: Path, num_instances: int | None, *args: str, sim: bool = True
) -> Iterator[Cluster]:
    """`kvflow cluster up [--instances N] ARGS` (with `SIM`'s fast steps when `sim`)."""
    port = free_port()
    instances = [] if num_instances is None else ["--instances", str(num_instances)]
    up = kvflow(
        "cluster", "up", *instances, "--port", str(port), "--state-dir", str(state_dir),
        *(SIM if sim else []), *args,
    )  # fmt: skip
    state_path = state_dir / "cluster.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"procs": []}
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip().splitlines()[-1] == f"http://127.0.0.1:{port}"
        yield Cluster(state_dir, f"http://127.0.0.1:{port}", state)
    finally:
        if state_path.exists():
            kvflow("cluster", "down", "--state-dir", str(state_dir), "--timeout", "20")
        kill_all([p["pid"] for p in state["procs"]])


def wait_until_router_knows(router: str, instance: str, more_than: float) -> float:
    """Poll the router until its peer directory says `instance` holds more than
    `more_than` blocks (its block events arrived); the count then (bounded: 10 s)."""
    deadline = time.monotonic() + 10.0
    while True:
        held = metric(router, "kvflow:router_directory_keys", instance=instance)
        if held > more_than:
            return held
        if time.monotonic() > deadline:
            raise AssertionError(f"the router never learned {instance}'s blocks (holds {held})")
        time.sleep(0.02)


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `check` until it holds (bounded: an AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s} s")
        time.sleep(0.05)


def kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        if is_ours(ProcessId(pid)):
            os.kill(pid, signal.SIGKILL)


__all__ = [
    "SIM",
    "Cluster",
    "cluster",
    "kill_all",
    "kvflow",
    "metric",
    "metrics",
    "wait_until",
    "wait_until_router_knows",
]
