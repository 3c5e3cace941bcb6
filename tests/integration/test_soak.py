"""`benchmarks/soak.py` against a real `kvflow serve --engine sim`: every request sent is
counted once in /metrics, every client that stayed got all its tokens, nothing is held
at rest, and SIGTERM exits 0 with a clean log. The default run sends a few hundred
requests; the slow one 5,000 and also holds the server's RSS flat after warm-up. (The
full 100,000-request run and its figures: README, "Guarantees".) TTFT steadiness is
reported by the script, not asserted here: a timing would make the test flaky."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "benchmarks" / "soak.py"
INVARIANTS = ("accounted", "outputs_whole", "at_rest", "clean_exit")


def soak(tmp_path: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    """The report line of a soak run (its exit status says whether every check held)."""
    command = [sys.executable, str(SOAK), "--log", str(tmp_path / "serve.log"), *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["event"] == "report", done.stdout + done.stderr
    report: dict[str, Any] = lines[-1]
    return report


def test_a_short_soak_counts_every_request_once_and_leaves_nothing(tmp_path: Path) -> None:
    # 30% leave and 5% are bad, so a few hundred requests meet every path.
    args = ["--requests", "300", "--clients", "8", "--seed", "1"]
    report = soak(tmp_path, *args, "--disconnect-fraction", "0.3", "--bad-fraction", "0.05",
                  timeout_s=300)  # fmt: skip
    assert {k: report["checks"][k] for k in INVARIANTS} == dict.fromkeys(INVARIANTS, True), report
    kinds = report["requests_by_kind"]
    assert report["requests_sent"] == 300 and kinds["bad"] > 0 and kinds["disconnect"] > 0
    assert report["server_finished_by_reason"].get("abort", 0) > 0  # some left mid-stream


@pytest.mark.slow
def test_a_5k_request_soak_holds_rss_and_threads_flat(tmp_path: Path) -> None:
    report = soak(tmp_path, "--requests", "5000", "--clients", "32", timeout_s=1200)
    checks = {k: report["checks"][k] for k in (*INVARIANTS, "rss_flat", "threads_flat")}
    assert checks == dict.fromkeys(checks, True), report
    print(json.dumps(report))
