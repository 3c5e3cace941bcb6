"""The terminal tables fit a 100-column terminal: no cell is cut or wrapped, every figure
shown is whole on one line, and what is left out is named."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from rich.console import Console
from rich.table import Table

from kvflow.config import KVFlowConfig
from kvflow.traces import bundled_sample_path, read_trace
from kvflow.traces.metrics import RunReport, summarize_replay
from kvflow.traces.replay import replay
from kvflow.traces.shaping import limit
from kvflow.traces.sweep import capacity, sweep
from kvflow.traces.tables import render_run_table, render_sweep_table, render_tenant_table

WIDTH = 100
POLICIES = ("fcfs", "lpm", "edf", "priority", "fair")


@pytest.fixture(scope="module")
def reports() -> list[RunReport]:
    """Every built-in policy over part of the bundled sample (two tenants), on a small
    tiered cache (hits from cpu and disk, preemptions) with a max_model_len that rejects
    some requests: every optional column appears."""
    requests = limit(read_trace(bundled_sample_path()).requests, 120)
    config = KVFlowConfig.from_dict(
        {},
        {
            "kv.device.num_blocks": 400,
            "kv.cpu.num_blocks": 800,
            "kv.disk.num_blocks": 2000,
            "scheduler.max_model_len": 1250,
        },
    )
    return [summarize_replay(replay(requests, config, name)) for name in POLICIES]


def rendered(table: Table, width: int = WIDTH) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()


def cells(table: Table) -> Iterator[str]:
    for column in table.columns:
        for cell in column.cells:
            assert isinstance(cell, str)
            yield cell


def assert_fits_whole(table: Table, width: int = WIDTH) -> str:
    text = rendered(table, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text
    for cell in cells(table):  # each figure in full, on one line
        assert any(cell in line for line in lines), cell
    return text


def test_the_run_table_fits_100_columns_with_the_key_figures(reports: list[RunReport]) -> None:
    assert any(r.num_rejected for r in reports) and any(r.num_preemptions for r in reports)
    table = render_run_table(reports, WIDTH, title="kvflow replay: sample.jsonl")
    text = assert_fits_whole(table)
    headers = [" ".join(str(c.header).split()) for c in table.columns]
    for kept in ("policy", "done/ total", "TTFT ms p50 / p99", "hit rate", "SLO met"):
        assert kept in headers
    for report in reports:
        assert report.policy in text
        assert f"{report.num_finished}/{report.num_requests}" in text
        assert f"{report.prefix_hit_rate:.1%}" in text
        assert f"{report.goodput_rps:.2f}" in text
    # What did not fit is named, and is in the JSON report.
    assert table.caption is not None and "not shown at 100 columns" in str(table.caption)
    assert "wall s" in str(table.caption)


def test_the_full_run_table_has_every_column_when_there_is_room(
    reports: list[RunReport],
) -> None:
    table = render_run_table(reports)
    headers = [" ".join(str(c.header).split()) for c in table.columns]
    assert headers == [
        "policy", "done/ total", "rejected", "TTFT ms p50 / p99", "TPOT ms p50 / p99",
        "ITL ms p99", "E2E ms p50", "out tok/s", "hit rate", "hit by tier dev/cpu/disk",
        "SLO met", "goodput req/s", "preempt", "steps", "wall s",
    ]  # fmt: skip
    assert table.caption is None
    assert_fits_whole(table, width=220)


def test_the_tenant_table_fits_100_columns(reports: list[RunReport]) -> None:
    table = render_tenant_table(reports, WIDTH)
    text = assert_fits_whole(table)
    assert table.row_count == 2 * len(POLICIES)
    for report in reports:
        for tenant in report.per_tenant.values():
            assert f"{tenant.num_finished}/{tenant.num_requests}" in text


def test_the_sweep_table_fits_100_columns() -> None:
    requests = limit(read_trace(bundled_sample_path()).requests, 60)
    config = KVFlowConfig.from_dict({}, {"scheduler.max_model_len": 1250})
    points = sweep(requests, config, ["fcfs", "lpm", "edf"], [10.0, 40.0], jobs=1)
    table = render_sweep_table(points, capacity(points), width=WIDTH)
    text = assert_fits_whole(table)
    assert "capacity (SLO met >= 90%)" in text


def test_a_narrow_terminal_keeps_the_essential_columns_whole(reports: list[RunReport]) -> None:
    table = render_run_table(reports, 60)
    headers = [" ".join(str(c.header).split()) for c in table.columns]
    assert headers == ["policy", "done/ total", "TTFT ms p50 / p99", "hit rate", "SLO met",
                       "goodput req/s"]  # fmt: skip
    assert_fits_whole(table, width=60)


def test_latencies_of_a_run_that_served_nothing_show_as_dashes() -> None:
    requests = limit(read_trace(bundled_sample_path()).requests, 10)
    config = KVFlowConfig.from_dict({}, {"kv.device.num_blocks": 1})
    report = summarize_replay(replay(requests, config, "fcfs"))
    assert report.num_finished == 0
    table = render_run_table([report], 140)  # room for every column
    assert_fits_whole(table, width=140)
    by_header = {" ".join(str(c.header).split()): list(c.cells) for c in table.columns}
    for latency in ("TTFT ms p50 / p99", "TPOT ms p50 / p99", "ITL ms p99", "E2E ms p50"):
        assert by_header[latency] == ["-"], latency
    assert by_header["SLO met"] == ["-"]  # no served request to meet an SLO
    assert by_header["done/ total"] == ["0/10"] and by_header["rejected"] == ["10"]
    assert report.to_json()["ttft_ms"] == dict.fromkeys(
        ("p50", "p90", "p95", "p99", "p999", "mean")
    )
