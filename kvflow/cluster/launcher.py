"""`kvflow cluster`: N `kvflow serve` processes on free loopback ports, each with a
peer service whose block events the router follows, and one `kvflow router` in front of
them, started detached, recorded in a state file, checked and stopped from it.

The state file lists what `up` started (pids, ports, URLs, log files) and is the only
thing `down` removes; `down` signals a pid only while its command line is still the
kvflow process it started (a pid reused by another program is left alone).

With `--pd P:D` the instances are P `--role prefill` and D `--role decode` servers, and
the router prefills each request on the former (`kvflow router --prefill`). With
`--ray` the instances are Ray actors, started and stopped by a driver process
(`kvflow.cluster.ray_fleet`) that `up` starts and records like the others."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import httpx

from kvflow.cluster.processes import ProcessId, is_ours, session_members, start_ticks

STATE_FILE = "cluster.json"
STATE_VERSION = 1
INSTANCE_ROLES = ("instance", "prefill", "decode")
"""Roles of serving processes: `instance` serves whole requests (`--role both`)."""
LOCAL_NODE = "local"
"""`Proc.node` of a Ray actor's process on the local Ray cluster `up` started."""
RAY_GRACE_S = 15.0
"""How long a Ray driver gets, beyond the instances' drain timeout, to stop its Ray
cluster, and then its session's processes to go, before SIGKILL."""
RAY_STOP_FILE = "ray-stop.json"
"""Written by `down` for the Ray driver: the instances' drain timeout."""


class ClusterError(RuntimeError):
    """A cluster could not be started, found or stopped (the message says why)."""


@dataclass(frozen=True)
class Proc:
    """One process of a cluster."""

    role: str
    """One of `INSTANCE_ROLES`, "router", or "ray" (the Ray driver)."""
    pid: int
    port: int
    url: str
    log: str
    """Its stdout and stderr."""
    node: str = ""
    """The Ray node an actor's process runs on (`LOCAL_NODE` on the local Ray cluster
    `up` started); "": a local process `up` started, which `down` signals. A Ray
    instance is stopped by its driver."""
    peer_port: int = 0
    """An instance's peer service, which publishes its block events to the router (0:
    none)."""
    start_ticks: int = 0
    """When the process started (clock ticks after boot, `start_ticks`), read as `up`
    started it: a later process given the same pid started later and is not this one
    (0: not recorded, the command line alone tells)."""

    @property
    def process_id(self) -> ProcessId:
        """What `is_ours` checks."""
        return ProcessId(self.pid, self.start_ticks)


@dataclass(frozen=True)
class RaySpec:
    """How `up --ray` places instances (`kvflow.cluster.ray_fleet`)."""

    address: str | None = None
    """A running Ray cluster's address; None: a local one started for the cluster."""
    cpus_per_instance: float = 1.0
    gpus_per_instance: float = 0.0


@dataclass(frozen=True)
class ClusterSpec:
    """What `up` starts: one instance per role, `serve_args` to each, and the router
    (`kvflow router ROUTER_ARGS`, then its instances)."""

    roles: tuple[str, ...]
    serve_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    """The router's own arguments: the instances' --config/--set (it reads the same
    config), --router, --model (its tokenizer)."""
    router_port: int = 8000
    ray: RaySpec | None = None
    pull_from_peers: bool = False
    """Instances pull cached prefixes from each other (`--peers`; engines with KV bytes
    only): see `pulls_from`."""

    def instance_args(self, role: str) -> list[str]:
        """`kvflow serve` arguments of an instance of `role`, without its ports and
        peers (`peer_args`)."""
        if role == "instance":
            return ["serve", *self.serve_args]
        return ["serve", *self.serve_args, "--role", role]

    def pulls_from(self, i: int) -> list[int]:
        """The instances instance i pulls from with `pull_from_peers` (none without):
        every other instance; in a prefill/decode split, a prefill instance the other
        prefill instances and a decode instance the prefill instances (its handoffs'
        source, followed from the start)."""
        if not self.pull_from_peers:
            return []
        sources = ("instance",) if self.roles[i] == "instance" else ("prefill",)
        return [j for j, role in enumerate(self.roles) if j != i and role in sources]


def peer_args(peer_port: int, peers: Sequence[str]) -> list[str]:
    """`kvflow serve` arguments for a peer service on `peer_port` (every instance of a
    cluster runs one: the router follows its block events) pulling from `peers`
    (host:port)."""
    args = ["--peer-port", str(peer_port)]
    return [*args, "--peers", ",".join(peers)] if peers else args


@dataclass(frozen=True)
class ClusterState:
    procs: tuple[Proc, ...]

    @property
    def router(self) -> Proc:
        return next(p for p in self.procs if p.role == "router")

    @property
    def instances(self) -> list[Proc]:
        return [p for p in self.procs if p.role in INSTANCE_ROLES]

    @property
    def ray_driver(self) -> Proc | None:
        return next((p for p in self.procs if p.role == "ray"), None)

    def to_json(self) -> str:
        procs = [asdict(p) for p in self.procs]
        return json.dumps({"version": STATE_VERSION, "procs": procs}, indent=2) + "\n"

    @staticmethod
    def read(path: Path) -> ClusterState:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, not {STATE_VERSION}")
            procs = data["procs"]
            if not isinstance(procs, list):
                raise ValueError(f"procs: expected a list, got {type(procs).__name__}")
            return ClusterState(tuple(_read_proc(i, p) for i, p in enumerate(procs)))
        except FileNotFoundError:
            raise ClusterError(f"no cluster state at {path} (is a cluster up?)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ClusterError(f"{path} is not a kvflow cluster state file: {err}") from None


_PROC_TYPES = {f.name: f.type for f in fields(Proc)}


def _read_proc(i: int, entry: object) -> Proc:
    """`procs[i]` of a state file, each field of its type (a file edited by hand)."""
    if not isinstance(entry, dict):
        raise ValueError(f"procs[{i}]: expected an object, got {type(entry).__name__}")
    for name, value in entry.items():
        kind = {"int": int, "str": str}.get(str(_PROC_TYPES.get(name)))
        if kind is None:
            raise ValueError(f"procs[{i}]: unknown field {name!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"procs[{i}].{name}: expected {kind.__name__}, got {value!r}")
    return Proc(**entry)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (through a temporary file beside it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def child_env() -> dict[str, str]:
    """This environment, with this kvflow first on PYTHONPATH: a child finds it even
    when it runs from a checkout."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def spawn(
    role: str, args: Sequence[str], port: int | None, log: Path, module: str = "kvflow"
) -> tuple[Proc, subprocess.Popen[bytes]]:
    """Start `python -m MODULE ARGS --port PORT` (no port: without `--port`) detached,
    its output in `log`."""
    env = child_env()
    port_args = [] if port is None else ["--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, *port_args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives `up`; not stopped by the terminal's ^C
        )
    started = start_ticks(proc.pid)  # our child, not reaped: its /proc entry is there
    if port is None:
        return Proc(role, proc.pid, 0, "", str(log), start_ticks=started), proc
    url = f"http://127.0.0.1:{port}"
    return Proc(role, proc.pid, port, url, str(log), start_ticks=started), proc


def tail(path: str, num_lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


def wait_healthy(procs: Sequence[tuple[Proc, subprocess.Popen[bytes]]], deadline: float) -> None:
    # Liveness from the child's own handle: its /proc entry may still show the
    # interpreter's launcher for a moment after it started.
    pending = list(procs)
    while pending:
        for p, popen in list(pending):
            if popen.poll() is not None:
                raise ClusterError(
                    f"{p.role} on port {p.port} exited {popen.returncode}:\n{tail(p.log)}"
                )
            if healthy(p.url):
                pending.remove((p, popen))
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{p.role} {p.url}" for p, _ in pending)
            raise ClusterError(f"not healthy in time: {names}\n{tail(pending[0][0].log)}")
        if pending:
            time.sleep(0.2)


def up(state_dir: Path, spec: ClusterSpec, timeout_s: float) -> ClusterState:
    """Start the instances, each with a peer service on a free port, wait for their
    health, then the router (`kvflow router ROUTER_ARGS --instance ... --prefill ...`,
    which follows their block events); the state file lists each process as it starts
    (so `down` finds them even if `up` itself is killed). A failure, Ctrl-C or SIGTERM
    stops everything started so far and removes the state file."""
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        old = ClusterState.read(state_path)
        if any(is_ours(p.process_id) for p in old.procs):
            raise ClusterError(
                f"a cluster is already up ({state_path}); `kvflow cluster down` it first"
            )
        state_path.unlink()  # ours, and everything it lists is gone
    state_dir.mkdir(parents=True, exist_ok=True)
    # Each process with the handle its liveness is read from (a Ray actor: the driver's).
    started: list[tuple[Proc, subprocess.Popen[bytes]]] = []
    deadline = time.monotonic() + timeout_s
    restore_sigterm = _stop_on_sigterm()

    def record() -> ClusterState:
        state = ClusterState(tuple(p for p, _ in started))
        write_atomic(state_path, state.to_json())
        return state

    try:
        if spec.ray is None:
            peer_ports = [free_port() for _ in spec.roles]
            for i, role in enumerate(spec.roles):
                log = state_dir / f"{role}-{i}.log"
                peers = [f"127.0.0.1:{peer_ports[j]}" for j in spec.pulls_from(i)]
                args = [*spec.instance_args(role), *peer_args(peer_ports[i], peers)]
                proc, popen = spawn(role, args, free_port(), log)
                started.append((replace(proc, peer_port=peer_ports[i]), popen))
                record()
        else:
            from kvflow.cluster.ray_fleet import start_ray_instances

            start_ray_instances(state_dir, spec, deadline, started)
            record()
        wait_healthy([s for s in started if s[0].role in INSTANCE_ROLES], deadline)
        args = ["router", *spec.router_args]
        for p, _ in started:
            if p.role in INSTANCE_ROLES:
                args += ["--prefill" if p.role == "prefill" else "--instance", p.url]
        router_log = state_dir / "router.log"
        started.append(spawn("router", args, spec.router_port, router_log))
        record()
        wait_healthy(started[-1:], deadline)
        return record()
    except BaseException:
        popens = list({id(popen): popen for _, popen in started}.values())
        for popen in popens:
            if popen.poll() is None:
                popen.terminate()
        for popen in popens:
            try:
                popen.wait(timeout=30.0)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10.0)
        state_path.unlink(missing_ok=True)  # it listed only what was just stopped
        raise
    finally:
        restore_sigterm()


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise `ClusterError` (in the main thread), so that `up` stops what
    it started as on Ctrl-C: its processes run in sessions of their own and no state
    file names them yet. Returns what puts the previous handler back."""

    def stopped(signum: int, frame: object) -> None:
        raise ClusterError("stopped by SIGTERM before the cluster was up; stopped what it started")

    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, stopped)
    except ValueError:  # not the main thread: signals are not this thread's to handle
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore


def stop(procs: Sequence[Proc], timeout_s: float) -> list[Proc]:
    """SIGTERM (they drain), then SIGKILL what is left after `timeout_s`. Returns the
    processes that had to be killed. Ray instances are their driver's to stop: it gets
    `RAY_GRACE_S` more to stop them and its Ray cluster, then whatever is left of its
    session (`up` starts it in a session of its own) is killed."""
    # The router first: it stops taking requests while the instances drain theirs.
    ordered = sorted((p for p in procs if not p.node), key=lambda p: p.role != "router")
    for p in ordered:
        if is_ours(p.process_id):
            _signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    killed = _wait_or_kill([p for p in ordered if p.role != "ray"], deadline)
    drivers = [p for p in ordered if p.role == "ray"]
    killed += _wait_or_kill(drivers, deadline + RAY_GRACE_S)
    for driver in drivers:
        _end_session(driver.pid, time.monotonic() + RAY_GRACE_S)
    return killed


def _end_session(sid: int, deadline: float) -> None:
    """Wait for the processes of a stopped driver's session to go (Ray's own processes
    follow their driver), then SIGKILL those left. A session id stays taken while any
    member lives, so these are the driver's descendants."""
    while session_members(sid) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.1)
    for pid in session_members(sid):
        _signal(pid, signal.SIGKILL)
    for _ in range(100):
        _reap()
        if not session_members(sid):
            break
        time.sleep(0.05)


def _wait_or_kill(procs: Sequence[Proc], deadline: float) -> list[Proc]:
    while any(is_ours(p.process_id) for p in procs) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.1)
    killed = [p for p in procs if is_ours(p.process_id)]
    for p in killed:
        _signal(p.pid, signal.SIGKILL)
    for _ in range(100):  # a killed process leaves /proc at once; bounded anyway
        _reap()
        if not any(is_ours(p.process_id) for p in killed):
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


def down(state_dir: Path, timeout_s: float) -> tuple[ClusterState, list[Proc], list[Proc]]:
    """Stop the cluster recorded in `state_dir` and remove its state file. Returns the
    state, the processes that had to be killed and those that had exited already."""
    state_path = state_dir / STATE_FILE
    state = ClusterState.read(state_path)
    gone = [p for p in state.procs if not p.node and not is_ours(p.process_id)]
    if state.ray_driver is not None:  # how long its instances may drain
        stop_file = state_dir / RAY_STOP_FILE
        stop_file.write_text(json.dumps({"drain_timeout_s": timeout_s}) + "\n")
    killed = stop(state.procs, timeout_s)
    left = [p for p in state.procs if p.node in ("", LOCAL_NODE) and is_ours(p.process_id)]
    if left:
        pids = ", ".join(str(p.pid) for p in left)
        raise ClusterError(f"processes {pids} outlived SIGKILL; {state_path} kept")
    state_path.unlink()
    return state, killed, gone


__all__ = [
    "INSTANCE_ROLES",
    "ClusterError",
    "ClusterSpec",
    "ClusterState",
    "Proc",
    "ProcessId",
    "RaySpec",
    "child_env",
    "down",
    "healthy",
    "is_ours",
    "peer_args",
    "session_members",
    "spawn",
    "start_ticks",
    "stop",
    "up",
]
