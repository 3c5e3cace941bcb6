"""Which processes are a cluster's: a pid names one of them only while it runs, is a
kvflow process and started when `up` recorded (so a pid reused later, by another kvflow
process too, is never signalled), and the members of a process session."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class ProcessId(NamedTuple):
    """A process as `up` recorded it (`Proc.process_id`)."""

    pid: int
    start_ticks: int = 0
    """When it started, in clock ticks after boot (`start_ticks`); 0: not recorded, the
    command line alone tells."""


class _Stat(NamedTuple):
    """The fields of /proc/PID/stat read here."""

    state: str
    """"Z": a zombie, gone but not yet reaped."""
    session_id: int
    start_ticks: int


def _read_stat(pid: int | str) -> _Stat | None:
    """/proc/PID/stat's state, session and start time (its 3rd, 6th and 22nd fields,
    counted after the command name, which may hold spaces and parentheses); None when
    it cannot be read (no such process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        return _Stat(fields[0], int(fields[3]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def is_ours(process: ProcessId) -> bool:
    """Whether `process` runs (not a zombie) and is a kvflow process (its command line
    names kvflow) that started at its `start_ticks` (when recorded), so a reused pid,
    another kvflow process's included, is never signalled."""
    stat = _read_stat(process.pid)
    if stat is None or stat.state == "Z":
        return False
    if process.start_ticks and stat.start_ticks != process.start_ticks:
        return False
    try:
        return b"kvflow" in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    except OSError:
        return False


def start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks after boot (/proc/PID/stat's 22nd field); 0
    when it cannot be read."""
    stat = _read_stat(pid)
    return 0 if stat is None else stat.start_ticks


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session `sid` (not zombies)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(entry.name)
        if stat is not None and stat.session_id == sid and stat.state != "Z":
            members.append(int(entry.name))
    return members


__all__ = ["ProcessId", "is_ours", "session_members", "start_ticks"]
