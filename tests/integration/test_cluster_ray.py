"""`kvflow cluster up --ray` on a real local Ray cluster (the driver's
`ray.init(num_cpus=2)`): two `kvflow serve --engine sim` instances as Ray actors serve
requests through the router, `status` reports them, and `kvflow cluster down` leaves no
actor, server or Ray process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import openai
import pytest

from kvflow.cluster.launcher import LOCAL_NODE, ProcessId, is_ours, session_members
from tests.cluster_process import cluster, kvflow

pytest.importorskip("ray")


def _cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                out.append((entry / "cmdline").read_bytes())
    return out


def test_ray_instances_serve_through_the_router_and_down_leaves_nothing(tmp_path: Path) -> None:
    driver_pid = 0
    try:
        with cluster(tmp_path, 2, "--ray") as c:
            (driver,) = [p for p in c.state["procs"] if p["role"] == "ray"]
            driver_pid = driver["pid"]
            assert [p["node"] for p in c.instances] == [LOCAL_NODE, LOCAL_NODE]
            client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="none", max_retries=0)
            served = set()
            for i in range(4):
                out = client.completions.with_raw_response.create(
                    model="kvflow-sim", prompt=f"request number {i}", max_tokens=3
                )
                usage = out.parse().usage
                assert usage is not None and usage.completion_tokens == 3
                served.add(out.headers["x-kvflow-instance"])
            assert served == {p["url"] for p in c.instances}
            status = kvflow("cluster", "status", "--state-dir", str(tmp_path))
            assert status.returncode == 0, status.stdout + status.stderr
            assert status.stdout.count("ray actor (local)") == 2
            assert status.stdout.count(" ok ") == 4
            # The driver's session holds the Ray cluster, the actors and their servers.
            members = session_members(driver_pid)
            assert {p["pid"] for p in c.instances} < set(members)
            session_dir = json.loads((tmp_path / "ray-ready.json").read_text())["session_dir"]
            assert any(session_dir.encode() in cmd for cmd in _cmdlines())
            down = kvflow("cluster", "down", "--state-dir", str(tmp_path), "--timeout", "30")
            assert down.returncode == 0, down.stderr
            assert "did not drain" not in down.stdout  # stopped by the driver, not killed
            assert session_members(driver_pid) == []
            assert not any(session_dir.encode() in cmd for cmd in _cmdlines())
            assert [pid for pid in c.pids if is_ours(ProcessId(pid))] == []
            assert not (tmp_path / "cluster.json").exists()
    finally:
        if driver_pid:  # whatever happened, nothing of the run outlives the test
            for pid in session_members(driver_pid):
                os.kill(pid, signal.SIGKILL)
