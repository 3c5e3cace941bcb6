"""`kvflow cluster`: N `kvflow serve` processes on free loopback ports and one `kvflow
router` in front of them, started detached, recorded in a state file, checked and
stopped from it.

The state file lists what `up` started (pids, ports, URLs, log files) and is the only
thing `down` removes; `down` signals a pid only while its command line is still the
kvflow process it started (a pid reused by another program is left alone)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

STATE_FILE = "cluster.json"
STATE_VERSION = 1


class ClusterError(RuntimeError):
    """A cluster could not be started, found or stopped (the message says why)."""


@dataclass(frozen=True)
class Proc:
    """One process of a cluster."""

    role: str
    """"instance" or "router"."""
    pid: int
    port: int
    url: str
    log: str
    """Its stdout and stderr."""


@dataclass(frozen=True)
class ClusterState:
    procs: tuple[Proc, ...]

    @property
    def router(self) -> Proc:
        return next(p for p in self.procs if p.role == "router")

    @property
    def instances(self) -> list[Proc]:
        return [p for p in self.procs if p.role == "instance"]

    def to_json(self) -> str:
        procs = [asdict(p) for p in self.procs]
        return json.dumps({"version": STATE_VERSION, "procs": procs}, indent=2) + "\n"

    @staticmethod
    def read(path: Path) -> ClusterState:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, not {STATE_VERSION}")
            return ClusterState(tuple(Proc(**p) for p in data["procs"]))
        except FileNotFoundError:
            raise ClusterError(f"no cluster state at {path} (is a cluster up?)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ClusterError(f"{path} is not a kvflow cluster state file: {err}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_ours(pid: int) -> bool:
    """Whether `pid` runs (not a zombie) and is a kvflow process (its command line
    names kvflow), so a reused pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"kvflow" in cmdline


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _spawn(
    role: str, args: Sequence[str], port: int, log: Path
) -> tuple[Proc, subprocess.Popen[bytes]]:
    env = dict(os.environ)
    # A child finds this kvflow even when it runs from a checkout on PYTHONPATH.
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvflow", *args, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives `up`; not stopped by the terminal's ^C
        )
    return Proc(role, proc.pid, port, f"http://127.0.0.1:{port}", str(log)), proc


def _tail(path: str, num_lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


def _wait_healthy(procs: Sequence[tuple[Proc, subprocess.Popen[bytes]]], deadline: float) -> None:
    # Liveness from the child's own handle: its /proc entry may still show the
    # interpreter's launcher for a moment after it started.
    pending = list(procs)
    while pending:
        for p, popen in list(pending):
            if popen.poll() is not None:
                raise ClusterError(
                    f"{p.role} on port {p.port} exited {popen.returncode}:\n{_tail(p.log)}"
                )
            if healthy(p.url):
                pending.remove((p, popen))
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{p.role} {p.url}" for p, _ in pending)
            raise ClusterError(f"not healthy in time: {names}\n{_tail(pending[0][0].log)}")
        if pending:
            time.sleep(0.2)


def up(
    state_dir: Path,
    num_instances: int,
    serve_args: Sequence[str],
    router: str,
    router_port: int,
    timeout_s: float,
) -> ClusterState:
    """Start the instances, wait for their health, then the router; write the state.
    A failure stops everything started so far."""
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        old = ClusterState.read(state_path)
        if any(is_ours(p.pid) for p in old.procs):
            raise ClusterError(
                f"a cluster is already up ({state_path}); `kvflow cluster down` it first"
            )
        state_path.unlink()  # ours, and everything it lists is gone
    state_dir.mkdir(parents=True, exist_ok=True)
    started: list[tuple[Proc, subprocess.Popen[bytes]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        for i in range(num_instances):
            port = free_port()
            log = state_dir / f"instance-{i}.log"
            started.append(_spawn("instance", ["serve", *serve_args], port, log))
        _wait_healthy(started, deadline)
        args = ["router", "--router", router]
        for p, _ in started:
            args += ["--instance", p.url]
        started.append(_spawn("router", args, router_port, state_dir / "router.log"))
        _wait_healthy(started[-1:], deadline)
        state = ClusterState(tuple(p for p, _ in started))
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(state_path)
        return state
    except BaseException:
        for _, popen in started:
            if popen.poll() is None:
                popen.terminate()
        for _, popen in started:
            try:
                popen.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10.0)
        raise


def stop(procs: Sequence[Proc], timeout_s: float) -> list[Proc]:
    """SIGTERM (they drain), then SIGKILL what is left after `timeout_s`. Returns the
    processes that had to be killed."""
    # The router first: it stops taking requests while the instances drain theirs.
    ordered = sorted(procs, key=lambda p: p.role != "router")
    for p in ordered:
        if is_ours(p.pid):
            _signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(is_ours(p.pid) for p in ordered) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.1)
    killed = [p for p in ordered if is_ours(p.pid)]
    for p in killed:
        _signal(p.pid, signal.SIGKILL)
    for _ in range(100):  # a killed process leaves /proc at once; bounded anyway
        _reap()
        if not any(is_ours(p.pid) for p in killed):
            break
        time.sleep(0.05)
    return killed


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap() -> None:
    """Collect exited children of this process (when `up` itself stops them)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def down(state_dir: Path, timeout_s: float) -> tuple[ClusterState, list[Proc]]:
    """Stop the cluster recorded in `state_dir` and remove its state file."""
    state_path = state_dir / STATE_FILE
    state = ClusterState.read(state_path)
    killed = stop(state.procs, timeout_s)
    left = [p for p in state.procs if is_ours(p.pid)]
    if left:
        pids = ", ".join(str(p.pid) for p in left)
        raise ClusterError(f"processes {pids} outlived SIGKILL; {state_path} kept")
    state_path.unlink()
    return state, killed


__all__ = ["ClusterError", "ClusterState", "Proc", "down", "healthy", "is_ours", "stop", "up"]
