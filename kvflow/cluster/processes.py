"""Which processes are a cluster's: a pid names one of them only while it runs, is a
kvflow process and started when `up` recorded (so a pid reused later, by another kvflow
process too, is never signalled), and the members of a process session."""

from __future__ import annotations

from pathlib import Path


def is_ours(pid: int, start_ticks: int = 0) -> bool:
    """Whether `pid` runs (not a zombie) and is a kvflow process (its command line
    names kvflow) that started at `start_ticks` (when given), so a reused pid, another
    kvflow process's included, is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] == "Z":
        return False
    if start_ticks and int(fields[19]) != start_ticks:
        return False
    return b"kvflow" in cmdline


def start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks after boot (/proc/PID/stat's 22nd field); 0
    when it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session `sid` (not zombies)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


__all__ = ["is_ours", "session_members", "start_ticks"]
