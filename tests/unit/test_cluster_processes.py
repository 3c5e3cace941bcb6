"""Which processes `kvflow cluster` may signal: one real child process, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvflow.cluster.processes import ProcessId, is_ours, session_members, start_ticks

# A command line that names kvflow, as every process `up` starts does.
_SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", "kvflow"]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(_SLEEPER, start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_running_kvflow_process_is_ours_only_at_its_recorded_start(
    child: subprocess.Popen[bytes],
) -> None:
    started = start_ticks(child.pid)
    assert started > 0
    assert is_ours(ProcessId(child.pid))  # no start recorded: the command line tells
    assert is_ours(ProcessId(child.pid, started))
    assert not is_ours(ProcessId(child.pid, started + 1))  # a later process, same pid


def test_a_process_of_another_program_is_not_ours() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            assert not is_ours(ProcessId(other.pid, start_ticks(other.pid)))
        finally:
            other.kill()


def test_an_exited_process_is_not_ours_and_has_no_start(child: subprocess.Popen[bytes]) -> None:
    pid, started = child.pid, start_ticks(child.pid)
    child.kill()
    child.wait(timeout=10)  # reaped: its /proc entry is gone
    assert not is_ours(ProcessId(pid, started))
    assert start_ticks(pid) == 0


def test_a_zombie_is_not_ours(child: subprocess.Popen[bytes]) -> None:
    started = start_ticks(child.pid)
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert start_ticks(child.pid) == started  # still listed in /proc
    assert not is_ours(ProcessId(child.pid, started))


def test_session_members_lists_a_new_session_s_live_leader(
    child: subprocess.Popen[bytes],
) -> None:
    assert session_members(child.pid) == [child.pid]  # it leads a session of its own
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert session_members(child.pid) == []  # a zombie is no live member
