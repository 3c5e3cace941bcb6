"""`kvflow replay` reports: plots, the step timeline, SLO flags, per-tenant JSON."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvflow.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert (length, kind) == (13, b"IHDR"), f"{path} does not start with IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def replay_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    assert main(["replay", *args, "--json", str(out)]) == 0
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def test_plot_writes_valid_pngs_per_policy(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    assert main(["replay", "-p", "fcfs", "-p", "lpm", "--plot", str(plots)]) == 0
    sizes = {p.name: png_size(p) for p in plots.iterdir()}
    assert sizes == {
        "ttft_cdf.png": (700, 450),
        "e2e_cdf.png": (700, 450),
        "timeseries_fcfs.png": (800, 800),
        "timeseries_lpm.png": (800, 800),
    }
    import matplotlib.image

    pixels = matplotlib.image.imread(plots / "ttft_cdf.png")
    assert pixels.shape[:2] == (450, 700)
    assert pixels.std() > 0  # something is drawn


def test_trace_events_have_a_step_event_per_scheduler_step(tmp_path: Path) -> None:
    events_path = tmp_path / "steps.json"
    doc = replay_json(tmp_path, "-p", "fcfs", "-p", "lpm", "--trace-events", str(events_path))
    events = json.loads(events_path.read_text())["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert set(tracks) == {"fcfs", "lpm"} and len(set(tracks.values())) == 2
    for run in doc["runs"]:
        tid = tracks[run["policy"]]
        steps = [e for e in events if e["ph"] == "X" and e["tid"] == tid]
        assert len(steps) == run["sim_steps"]
        for e in steps:
            assert set(e) == {"name", "cat", "ph", "pid", "tid", "ts", "dur", "args"}
            assert set(e["args"]) == {
                "step_id",
                "batch_size",
                "num_prefill_tokens",
                "num_decode_tokens",
                "num_kv_tokens",
                "num_preempted",
            }
        computed = sum(
            e["args"]["num_prefill_tokens"] + e["args"]["num_decode_tokens"] for e in steps
        )
        # Each request computes its uncached prompt and feeds back every output token but
        # its last; recomputation after a preemption only adds to that.
        least = run["num_prompt_tokens"] - run["num_cached_tokens"]
        least += run["num_output_tokens"] - run["num_finished"]
        assert computed >= least
        kinds = {e["name"] for e in steps}
        assert {"mixed", "decode"} <= kinds
        counters = [e for e in events if e["ph"] == "C" and e["tid"] == tid]
        assert {e["name"] for e in counters} == {f"{run['policy']} queue", f"{run['policy']} kv"}


def test_runs_carry_per_tenant_figures_that_add_up(tmp_path: Path) -> None:
    doc = replay_json(tmp_path, "-p", "lpm")
    run = doc["runs"][0]
    tenants = run["per_tenant"]
    assert set(tenants) == {"t0", "t1"}
    assert sum(t["num_requests"] for t in tenants.values()) == run["num_requests"] == 400
    assert sum(t["num_slo_met"] for t in tenants.values()) == run["num_slo_met"]
    assert sum(t["goodput_rps"] for t in tenants.values()) == pytest.approx(run["goodput_rps"])
    # The sample's t0 is interactive (500 ms TTFT, 50 ms TPOT), t1 batch-like: t0 fares worse.
    assert tenants["t0"]["slo_attainment"] < tenants["t1"]["slo_attainment"]
    assert run["kv_wait_ms"]["mean"] == 0.0  # one tier: nothing is ever loaded
    assert doc["slo"] == {"ttft_ms": None, "tpot_ms": None, "per_tenant": {}, "override": False}


def test_global_slos_fill_in_only_unless_overridden(tmp_path: Path) -> None:
    base = replay_json(tmp_path, "-p", "fcfs")["runs"][0]
    # Every request of the sample has its own SLOs: filling in changes nothing.
    filled = replay_json(tmp_path, "-p", "fcfs", "--ttft-slo-ms", "1", "--tpot-slo-ms", "1")
    assert filled["runs"][0]["num_slo_met"] == base["num_slo_met"]
    loose = ["--ttft-slo-ms", "1e6", "--tpot-slo-ms", "1e6", "--slo-override"]
    overridden = replay_json(tmp_path, "-p", "fcfs", *loose)
    assert overridden["runs"][0]["slo_attainment"] == 1.0
    assert overridden["slo"]["override"] is True and overridden["slo"]["ttft_ms"] == 1e6
    # A tenant's setting beats the global one: t0 gets an impossible 1 ms TTFT.
    strict_t0 = replay_json(tmp_path, "-p", "fcfs", *loose, "--tenant-slo", "t0=1")
    tenants = strict_t0["runs"][0]["per_tenant"]
    assert tenants["t0"]["slo_attainment"] == 0.0 and tenants["t1"]["slo_attainment"] == 1.0
    assert strict_t0["slo"]["per_tenant"] == {"t0": {"ttft_ms": 1.0, "tpot_ms": None}}


def test_bad_slo_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--ttft-slo-ms", "-5"], ["--tenant-slo", "t0"], ["--tpot-slo-ms", "fast"]):
        with pytest.raises(SystemExit):
            main(["replay", "-p", "fcfs", *bad])
        assert bad[1] in capsys.readouterr().err
    assert main(["replay", "-p", "fcfs", "--tenant-slo", "a=1", "--tenant-slo", "a=2"]) == 2
    assert "same tenant twice" in capsys.readouterr().err


def test_json_to_stdout_is_pure_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "-p", "fcfs", "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["runs"][0]["policy"] == "fcfs"
    assert "kvflow replay" in captured.err  # the table went to stderr


def test_plain_replay_does_not_import_matplotlib() -> None:
    code = (
        "import sys; from kvflow.cli import main; "
        "assert main(['replay', '-p', 'fcfs']) == 0; "
        "assert 'matplotlib' not in sys.modules, 'imported matplotlib'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["replay", "-p", "fcfs", "--plot", str(tmp_path / "plots")]) == 2
    assert "pip install 'kvflow[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
