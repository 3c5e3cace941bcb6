"""Timing the store's tier copies (`kvflow.kv.bandwidth`): real copies through the
copy engine into a real slab file; no timed assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from kvflow.config import KVFlowConfig, TransferConfig
from kvflow.kv.bandwidth import (
    DIRECTIONS,
    DirectionFit,
    _fit_line,
    measure_transfer,
    transfer_settings,
)


def test_a_line_through_copy_times_gives_bandwidth_and_latency() -> None:
    # 2 GB/s and 100 us: 1 MB takes 600 us, 4 MB 2.1 ms.
    gbps, latency_us = _fit_line([(1_000_000, 600e-6), (4_000_000, 2100e-6)])
    assert gbps == pytest.approx(2.0) and latency_us == pytest.approx(100.0)
    # Bigger batches no slower: no size dependence, the largest batch's rate, no latency.
    assert _fit_line([(1_000_000, 1e-3), (4_000_000, 1e-3)]) == pytest.approx((4.0, 0.0))


def test_measured_copies_become_the_configs_transfer_settings(tmp_path: Path) -> None:
    kv = KVFlowConfig.load(
        None,
        {"kv.layout.num_layers": 2, "kv.layout.num_kv_heads": 2, "kv.layout.head_dim": 16,
         "kv.layout.dtype": "float32", "kv.block_size": 4},
    ).kv  # fmt: skip
    fits = measure_transfer(kv, "cpu", sizes_mib=(0.0625, 0.25), repeat=2, directory=tmp_path)
    assert [f.direction for f in fits] == list(DIRECTIONS)
    for f in fits:
        assert isinstance(f, DirectionFit) and f.gbps > 0 and f.latency_us >= 0
        assert [b for b, _ in f.points] == [64 * 1024, 256 * 1024]
        assert all(t > 0 for _, t in f.points)
    settings = transfer_settings(fits)
    assert TransferConfig(**settings).cpu_to_disk_gbps == settings["cpu_to_disk_gbps"]
    assert list(tmp_path.iterdir()) == []  # the test slab is gone
    with pytest.raises(ValueError, match="repeat >= 1"):
        measure_transfer(kv, "cpu", repeat=0)
