"""`kvflow cluster up --ray`: each instance is a Ray actor that runs one `kvflow serve`
process (with its peer service, as every cluster instance has) on the node Ray placed
it on.

`up` starts a driver process (`python -m kvflow.cluster.ray_driver SPEC`, recorded in
the state file with role "ray") that connects to the Ray cluster at `--ray-address`, or
starts a local one (`ray.init(num_cpus=...)`), creates one `InstanceActor` per instance,
has each pick its ports on its node, starts each instance pulling from the peer
services `ClusterSpec.pulls_from` names, and writes back each instance's URL, pid, peer
port and node; the router is then started with those URLs as usual. The driver holds
the actors until SIGTERM, then has each actor stop its server (SIGTERM: it drains) and
exits, ending the actors and a local Ray cluster with it. An actor's server dies with
the actor (`PR_SET_PDEATHSIG`), and the actors and a local cluster die with the driver
(Ray's fate sharing): a killed driver leaves nothing behind either. Ray is an optional
dependency: `pip install 'kvflow[ray]'`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvflow.cluster.launcher import (
    INSTANCE_ROLES,
    LOCAL_NODE,
    RAY_STOP_FILE,
    ClusterError,
    Proc,
    child_env,
    free_port,
    peer_args,
    spawn,
    tail,
)

if TYPE_CHECKING:
    from kvflow.cluster.launcher import ClusterSpec

SPEC_FILE = "ray-spec.json"
READY_FILE = "ray-ready.json"

# The server's process asks to be killed when the actor's process dies, then becomes
# `kvflow serve` (the setting survives exec); a parent gone before the ask is caught
# by comparing the parent pid.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


class InstanceActor:
    """One `kvflow serve` process on this actor's node (wrapped by `ray.remote` in the
    driver: this module does not import ray)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._where: dict[str, Any] = {}

    def reserve(self, local: bool) -> dict[str, Any]:
        """Pick the server's free port and its peer service's on this node: on loopback
        on a local cluster, else on the node's address (the peer service then needs
        `peer.secret`). Returns the host, both ports and the node, for the driver to
        name this instance's peer service to the instances that pull from it."""
        import ray

        node: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        host = "127.0.0.1" if local else node
        self._where = {
            "host": host,
            "port": free_port(host),
            "peer_port": free_port(host),
            "node": LOCAL_NODE if local else node,
        }
        return dict(self._where)

    def start(self, args: list[str], peers: list[str], log: str) -> dict[str, Any]:
        """Start the server on the reserved ports, pulling from `peers` (host:port).
        Returns its pid, ports, URL, log and node."""
        where = self._where
        host, port, peer_port = where["host"], where["port"], where["peer_port"]
        extra = ["--host", host, "--port", str(port), *peer_args(peer_port, peers)]
        if where["node"] != LOCAL_NODE:
            extra += ["--set", f"peer.host={host}"]
        log_path = Path(log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "kvflow", *args, *extra]
        with log_path.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        return {
            "pid": self._proc.pid,
            "port": port,
            "peer_port": peer_port,
            "url": f"http://{host}:{port}",
            "log": str(log_path),
            "node": where["node"],
        }

    def stop(self, timeout_s: float) -> bool:
        """SIGTERM the server (it drains), SIGKILL after `timeout_s`; whether it exited
        by itself."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30.0)
            return False


def start_ray_instances(
    state_dir: Path,
    spec: ClusterSpec,
    deadline: float,
    started: list[tuple[Proc, subprocess.Popen[bytes]]],
) -> None:
    """Start the driver, wait for its instances' addresses, and add the driver and each
    instance (watched through the driver's handle) to `started`."""
    assert spec.ray is not None
    spec_path = state_dir / SPEC_FILE
    ready_path = state_dir / READY_FILE
    ready_path.unlink(missing_ok=True)
    (state_dir / RAY_STOP_FILE).unlink(missing_ok=True)  # a previous cluster's
    instances = [
        {
            "name": f"{role}-{i}",
            "role": role,
            "args": spec.instance_args(role),
            "pulls_from": spec.pulls_from(i),
            "log": str((state_dir / f"{role}-{i}.log").resolve()),
        }
        for i, role in enumerate(spec.roles)
    ]
    driver_spec = {
        "address": spec.ray.address,
        "cpus_per_instance": spec.ray.cpus_per_instance,
        "gpus_per_instance": spec.ray.gpus_per_instance,
        "namespace": f"kvflow-{os.getpid()}-{int(time.time())}",
        "instances": instances,
        "ready": str(ready_path.resolve()),
    }
    spec_path.write_text(json.dumps(driver_spec, indent=2) + "\n")
    driver, popen = spawn(
        "ray", [str(spec_path.resolve())], None, state_dir / "ray.log", "kvflow.cluster.ray_driver"
    )
    started.append((driver, popen))
    while not ready_path.exists():
        if popen.poll() is not None:
            raise ClusterError(f"the Ray driver exited {popen.returncode}:\n{tail(driver.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the Ray driver did not start its actors in time:\n{tail(driver.log)}"
            )
        time.sleep(0.2)
    ready = json.loads(ready_path.read_text())
    if "error" in ready:
        raise ClusterError(f"Ray: {ready['error']}")
    for inst, info in zip(instances, ready["instances"], strict=True):
        role = inst["role"]
        assert role in INSTANCE_ROLES
        where = (info["url"], info["log"], info["node"], info["peer_port"])
        proc = Proc(role, info["pid"], info["port"], *where)
        started.append((proc, popen))


__all__ = ["InstanceActor", "start_ray_instances"]
