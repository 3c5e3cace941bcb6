"""`kvflow cluster up/status/down` with real `kvflow serve --engine sim` processes
behind a real `kvflow router`, driven through the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvflow.cluster.launcher import ProcessId, child_env, is_ours
from tests.cli_run import CLI
from tests.cluster_process import (
    SIM,
    Cluster,
    cluster,
    kvflow,
    metric,
    metrics,
    wait_until_router_knows,
)
from tests.serve_process import ServerProcess, free_port

MODEL = "kvflow-sim"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("cluster"), 3) as c:
        yield c


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30.0, max_retries=0)


def test_requests_through_the_router_streamed_and_not(fleet: Cluster) -> None:
    client = _client(fleet.url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    assert out.usage is not None and out.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=MODEL, prompt="a b", max_tokens=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).count("tok") == 7
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in chat if c.choices]
    assert "".join(deltas).count("tok") == 4
    routed = metric(fleet.url, "kvflow:router_requests_total")
    assert routed == 3
    status = kvflow("cluster", "status", "--state-dir", str(fleet.state_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" ok ") == 4


def _turn(router: str, messages: list[dict[str, str]]) -> str:
    """One chat turn through `router`: the instance that served it (the reply joins
    `messages`), once the router's peer directory has its new blocks."""
    held = {
        dict(labels)["instance"]: value
        for (name, labels), value in metrics(router).items()
        if name == "kvflow:router_directory_keys"
    }
    r = httpx.post(
        f"{router}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    served: str = r.headers["x-kvflow-instance"]
    wait_until_router_knows(router, served, held.get(served, 0.0))
    return served


def _question(turn: int, c: int) -> dict[str, str]:
    # 24 words: every turn adds at least one full block (16 tokens) to the prompt.
    return {"role": "user", "content": " ".join(f"q{turn}c{c}w{i}" for i in range(24))}


def test_cache_aware_keeps_each_conversation_on_the_instance_holding_its_prefix(
    fleet: Cluster,
) -> None:
    before = {p["url"]: metric(p["url"], "kvflow:prefix_cache_hits_total") for p in fleet.instances}
    conversations = [
        [{"role": "system", "content": " ".join(f"c{c}w{i}" for i in range(120))}] for c in range(3)
    ]
    seen: list[set[str]] = [set() for _ in conversations]
    for turn in range(4):
        for c, messages in enumerate(conversations):
            messages.append(_question(turn, c))
            seen[c].add(_turn(fleet.url, messages))
    assert all(len(s) == 1 for s in seen), seen
    assert len(set.union(*seen)) == 3  # new prefixes spread over the fleet
    for s in seen:
        (url,) = s
        assert metric(url, "kvflow:prefix_cache_hits_total") > before[url]


def test_a_second_router_follows_the_same_block_events(fleet: Cluster, tmp_path: Path) -> None:
    # The second router never saw the first turns: it knows where they went from the
    # instances' block events alone.
    args = [*SIM, "--router", "cache-aware"]
    for p in fleet.instances:
        args += ["--instance", p["url"]]
    messages = [{"role": "system", "content": " ".join(f"side{i}" for i in range(100))}]
    messages.append(_question(0, 9))
    first = _turn(fleet.url, messages)
    with ServerProcess(args, tmp_path / "router-b.log", program=("-m", "kvflow", "router")) as b:
        wait_until_router_knows(b.base_url, first, 0)
        hits = metric(first, "kvflow:prefix_cache_hits_total")
        for turn in range(1, 3):
            messages.append(_question(turn, 9))
            assert _turn(b.base_url, messages) == first
        assert metric(first, "kvflow:prefix_cache_hits_total") > hits


def test_a_killed_instance_leaves_the_rotation_and_down_leaves_no_process(tmp_path: Path) -> None:
    with cluster(tmp_path, 3, "--router", "round-robin") as c:
        victim = c.instances[1]
        os.kill(victim["pid"], signal.SIGKILL)
        client = _client(c.url)
        served = set()
        for i in range(12):
            out = client.completions.with_raw_response.create(
                model=MODEL, prompt=f"request {i}", max_tokens=3
            )
            assert out.parse().usage is not None
            served.add(out.headers["x-kvflow-instance"])
        assert victim["url"] not in served and len(served) == 2
        healthy = "kvflow:router_instance_healthy"
        assert metric(c.url, healthy, instance=victim["url"]) == 0
        status = kvflow("cluster", "status", "--state-dir", str(tmp_path))
        assert status.returncode == 1 and "gone" in status.stdout
        down = kvflow("cluster", "down", "--state-dir", str(tmp_path), "--timeout", "30")
        assert down.returncode == 0, down.stderr
        # Not "stopped 4": the killed one is named as gone before.
        gone = f"stopped 3 processes; 1 had exited already: instance pid {victim['pid']}"
        assert gone in " ".join(down.stdout.split()), down.stdout
        assert not (tmp_path / "cluster.json").exists()
        assert (tmp_path / "router.log").exists()  # logs stay
        assert [pid for pid in c.pids if is_ours(ProcessId(pid))] == []


def test_up_refuses_a_second_cluster_in_the_same_state_dir(fleet: Cluster) -> None:
    again = kvflow("cluster", "up", "--instances", "1", "--state-dir", str(fleet.state_dir))
    assert again.returncode == 2 and "already up" in again.stderr


@pytest.mark.parametrize("action", ["up", "status", "down"])
def test_a_state_dir_that_is_a_file_is_named_and_left_alone(
    tmp_path: Path, cli: CLI, action: str
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    extra = ["--instances", "1", "--engine", "sim"] if action == "up" else []
    run = kvflow if action == "up" else cli  # up, were the refusal lost, would start one
    out = run("cluster", action, "--state-dir", str(notes), *extra)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"kvflow: error: --state-dir {str(notes)!r} is not a directory")
    assert notes.read_text() == "mine\n"


def test_status_and_down_without_a_cluster_say_so(tmp_path: Path, cli: CLI) -> None:
    for action in ("status", "down"):
        out = cli("cluster", action, "--state-dir", str(tmp_path))
        assert out.returncode == 2
        assert out.stderr.startswith("kvflow: error: no cluster state at")
        assert "Traceback" not in out.stderr


def test_a_failing_instance_stops_what_up_started(tmp_path: Path) -> None:
    # A bad policy passes the CLI's own checks only as far as the instances.
    out = kvflow(
        "cluster", "up", "--instances", "2", "--state-dir", str(tmp_path),
        "--engine", "sim", "--policy", "no-such-policy", "--timeout", "60",
    )  # fmt: skip
    assert out.returncode == 2 and "exited" in out.stderr
    assert not (tmp_path / "cluster.json").exists()


def _processes_in(cwd: Path) -> list[int]:
    """Pids of the live processes whose working directory is `cwd` (what `up`, started
    there, started: its children inherit it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_ours(ProcessId(int(entry.name))):
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == cwd:
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def _up_in_background(
    tmp_path: Path, left: list[int]
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`kvflow cluster up --instances 2` started from `tmp_path`, and its state dir; on
    leaving, it and every process still running from `tmp_path` are killed, their pids
    put in `left` (a test asserts it empty: nothing was left behind)."""
    state_dir = tmp_path / "state"
    command = [
        sys.executable, "-m", "kvflow", "cluster", "up", "--instances", "2",
        "--state-dir", str(state_dir), "--port", str(free_port()), *SIM,
    ]  # fmt: skip
    up = subprocess.Popen(
        command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield up, state_dir
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=30)
        left.extend(_processes_in(tmp_path))
        for pid in left:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_stopped_while_starting_stops_what_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Ctrl-C, or a supervisor's SIGTERM, before the cluster is up: the instances it had
    # started go too (they run in sessions of their own: nothing else would stop them,
    # and no state file names them), with one line and no traceback.
    left: list[int] = []
    with _up_in_background(tmp_path, left) as (up, state_dir):
        deadline = time.monotonic() + 60
        listed: list[object] = []
        while len(listed) < 2:  # both instances started (the state file lists them)
            assert up.poll() is None and time.monotonic() < deadline, up.returncode
            with contextlib.suppress(OSError, ValueError):
                listed = json.loads((state_dir / "cluster.json").read_text())["procs"]
            time.sleep(0.02)
        up.send_signal(sig)
        _, err = up.communicate(timeout=120)
    assert left == []
    stderr = err.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvflow: "), stderr
    assert up.returncode != 0
    assert not (state_dir / "cluster.json").exists()


def test_down_with_a_stale_state_file_leaves_a_process_that_took_a_pid_alone(
    tmp_path: Path,
) -> None:
    # A cluster whose processes are gone (killed, or the machine restarted) leaves its
    # state file; the pids it names may be another kvflow process's by then.
    with cluster(tmp_path, 1) as c:
        state = c.state
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "kvflow"])
    try:
        stale = {**state, "procs": [{**p, "pid": other.pid} for p in state["procs"]]}
        (tmp_path / "cluster.json").write_text(json.dumps(stale))
        status = kvflow("cluster", "status", "--state-dir", str(tmp_path))
        assert status.returncode == 1 and "gone" in status.stdout
        down = kvflow("cluster", "down", "--state-dir", str(tmp_path), "--timeout", "5")
        assert down.returncode == 0, down.stderr
        assert "stopped 0 processes; 2 had exited already" in down.stdout, down.stdout
        assert other.poll() is None, "cluster down signalled a process it did not start"
        assert not (tmp_path / "cluster.json").exists()
    finally:
        other.kill()
        other.wait(timeout=30)


_PROC = {"role": "instance", "pid": 1, "port": 8001, "url": "http://127.0.0.1:8001", "log": "x"}


@pytest.mark.parametrize(
    ("state", "named"),
    [
        ([1], "JSON object"),
        # Edited by hand: a field of the wrong type was a traceback in `status`.
        ({"version": 1, "procs": [{**_PROC, "url": 8001}]}, "procs[0].url"),
        ({"version": 1, "procs": [{**_PROC, "pid": "1"}]}, "procs[0].pid"),
        ({"version": 1, "procs": [_PROC, {**_PROC, "start_ticks": None}]}, "procs[1].start_ticks"),
    ],
)
def test_a_state_file_that_is_not_a_cluster_s_is_one_line_naming_what(
    tmp_path: Path, cli: CLI, state: object, named: str
) -> None:
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    for action in ("status", "down"):
        out = cli("cluster", action, "--state-dir", str(tmp_path))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("kvflow: error: ")
        assert "is not a kvflow cluster state" in out.stderr and named in out.stderr
    assert (tmp_path / "cluster.json").exists()  # kept for the user to look at


def test_up_with_port_0_puts_the_router_on_a_free_port_and_prints_it(tmp_path: Path) -> None:
    up = kvflow(
        "cluster", "up", "--instances", "1", "--port", "0", "--state-dir", str(tmp_path),
        "--timeout", "60", *SIM,
    )  # fmt: skip
    state_path = tmp_path / "cluster.json"
    pids = (
        [p["pid"] for p in json.loads(state_path.read_text())["procs"]]
        if state_path.exists()
        else []
    )
    try:
        assert up.returncode == 0, up.stderr
        url = up.stdout.strip().splitlines()[-1]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0"), url
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if state_path.exists():
            kvflow("cluster", "down", "--state-dir", str(tmp_path), "--timeout", "20")
        for pid in pids:
            if is_ours(ProcessId(pid)):
                os.kill(pid, signal.SIGKILL)


def test_up_killed_while_starting_leaves_a_state_file_down_stops_from(tmp_path: Path) -> None:
    # SIGKILL (the OOM killer, a supervisor's hard stop) gives `up` no chance to clean up:
    # what it had started must be listed in the state file as it goes, so `down` finds it.
    left: list[int] = []
    with _up_in_background(tmp_path, left) as (up, state_dir):
        state_path = state_dir / "cluster.json"
        deadline = time.monotonic() + 60
        listed: list[dict[str, object]] = []
        while len(listed) < 2:  # both instances listed, before the router is
            assert up.poll() is None and time.monotonic() < deadline, up.returncode
            with contextlib.suppress(OSError, ValueError):
                listed = json.loads(state_path.read_text())["procs"]
                assert all(p["role"] != "router" for p in listed), listed
            time.sleep(0.01)
        up.kill()
        up.wait(timeout=30)
        assert any(is_ours(ProcessId(int(str(p["pid"])))) for p in listed)
        down = kvflow("cluster", "down", "--state-dir", str(state_dir), "--timeout", "30")
        assert down.returncode == 0, down.stderr
    assert left == []
    assert not state_path.exists()
