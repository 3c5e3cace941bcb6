"""Faults of the disk tier in the middle of a run, with the torch runner computing over
real tensors: a first run writes every block through to the slab; the device and cpu
caches are then emptied, so the second run's prefix hits come from disk, and the fault
strikes in between. Whatever the fault, the second run's greedy tokens equal the first
run's (a bad block is a miss and is recomputed, never read as KV), the fault is counted
(`kv_tier_errors`), and the tier is disabled only when the disk is full."""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvflow.engine_adapters.hf import save_random_hf_llama  # noqa: E402
from kvflow.engine_adapters.torch import TorchLlama, TorchRunner  # noqa: E402
from kvflow.kv.store import KVStore  # noqa: E402
from kvflow.scheduler import Scheduler  # noqa: E402
from kvflow.traces.replay import make_policy  # noqa: E402
from tests.builders import make_config, run_over_real_copies  # noqa: E402
from tests.integration.test_exactness import SPEC, make_requests  # noqa: E402

Fault = Callable[[KVStore, pytest.MonkeyPatch], None]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("tiny-llama")
    save_random_hf_llama(SPEC, path, seed=3, init_std=0.2)
    return TorchLlama.from_pretrained(path, dtype="float64", device="cpu")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KVStore]:
    config = _config(tmp_path)
    s = KVStore.with_tensors(config.kv)
    yield s
    s.close()


def _config(tmp_path: Path) -> Any:
    return make_config(
        **{
            "kv.block_size": 4,
            "kv.device.num_blocks": 40,
            "kv.cpu.num_blocks": 8,
            "kv.disk.num_blocks": 128,
            "kv.disk.path": str(tmp_path / "kv.slab"),
            "kv.write_policy": "write_through",
            "kv.load_policy": "always",
            "kv.layout.num_layers": SPEC.num_layers,
            "kv.layout.num_kv_heads": SPEC.num_kv_heads,
            "kv.layout.head_dim": SPEC.head_dim,
            "kv.layout.dtype": SPEC.dtype,
        }
    )


def _run(store: KVStore, model: Any, tmp_path: Path) -> tuple[dict[str, list[int]], Scheduler]:
    """Serve `make_requests(12)` to the end; the tokens by request id."""
    config = _config(tmp_path)
    scheduler = Scheduler(config, make_policy("fcfs", config), store)
    assert store.device_storage is not None
    runner = TorchRunner(model, 4, kv_cache=store.device_storage.data)
    states = [scheduler.add(r) for r in make_requests(12)]
    store.drain(run_over_real_copies(scheduler, runner, store))
    scheduler.check_integrity()
    return {s.request_id: s.output_token_ids for s in states}, scheduler


def _disk_slots(store: KVStore) -> list[int]:
    assert store.disk is not None
    return sorted(store.disk._cached.values())


def corrupt_every_other_block(store: KVStore, _: pytest.MonkeyPatch) -> None:
    assert store.disk_storage is not None
    with open(store.disk_storage.path, "r+b") as f:
        for slot in _disk_slots(store)[::2]:
            f.seek(store.disk_storage.block_offset(slot) + 5)
            f.write(b"\x5a" * 3)


def truncate_the_slab(store: KVStore, _: pytest.MonkeyPatch) -> None:
    """Cut the slab in the middle of its fourth written block: reads past it are short."""
    disk = store.disk_storage
    assert disk is not None
    cut = disk.block_offset(_disk_slots(store)[3]) + disk.bytes_per_block // 2
    os.truncate(disk.path, cut)


def fail_reads_with_eio(_: KVStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*args: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)


def short_reads(_: KVStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv

    def half(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        return real(fd, [b[: len(b) // 2] for b in buffers], offset, flags)

    monkeypatch.setattr(os, "preadv", half)


def delete_the_slab(store: KVStore, _: pytest.MonkeyPatch) -> None:
    assert store.disk_storage is not None
    os.unlink(store.disk_storage.path)


def fill_the_disk(_: KVStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)


@pytest.mark.parametrize(
    ("fault", "counted", "disabled"),
    [
        (corrupt_every_other_block, True, False),
        (truncate_the_slab, True, False),
        (short_reads, True, False),
        (fail_reads_with_eio, True, False),
        (delete_the_slab, False, False),  # the open file lives on: nothing to count
        (fill_the_disk, True, True),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_a_disk_fault_between_runs_is_recomputed_counted_and_contained(
    store: KVStore,
    model: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Fault,
    counted: bool,
    disabled: bool,
) -> None:
    clean, _ = _run(store, model, tmp_path)
    assert store.stats.num_tier_errors == 0 and len(_disk_slots(store)) >= 8
    store.device.reset_prefix_cache()
    assert store.cpu is not None and store.disk_storage is not None
    store.cpu.reset_prefix_cache()
    fault(store, monkeypatch)
    with (
        pytest.warns(RuntimeWarning, match="disk tier .* disabled: disk full")
        if disabled
        else _no_warning()
    ):
        faulted, scheduler = _run(store, model, tmp_path)
    monkeypatch.undo()
    assert faulted == clean
    assert (store.stats.num_tier_errors > 0) is counted
    assert store.disk_storage.enabled is not disabled
    hits = scheduler.stats.hit_tokens_by_tier["disk"]
    if fault is delete_the_slab:
        assert hits > 0  # served from the unlinked file, whole
        store.close()  # and closing it neither fails nor makes a new file
        assert not store.disk_storage.path.exists()
    if fault in (fail_reads_with_eio, fill_the_disk):
        # Every read fails (nothing is a hit), or reads still work (only writes fail).
        assert (hits == 0) is (fault is fail_reads_with_eio)


@contextmanager
def _no_warning() -> Iterator[None]:
    """A block in which a RuntimeWarning (the disk tier disabled) is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


@pytest.fixture(scope="module")
def small_tmpfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """What `tests.disk_tmpfs_process` saw in each case, on a fresh 64 KiB tmpfs each,
    run in a user and mount namespace (no root needed where those are allowed)."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to mount a small tmpfs")
    base = tmp_path_factory.mktemp("tmpfs")
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.disk_tmpfs_process", str(base)]
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    if done.returncode == 77 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {line.pop("case"): line for line in lines}


def test_a_slab_larger_than_its_file_system_is_refused_before_it_is_made(
    small_tmpfs: dict[str, dict[str, Any]],
) -> None:
    seen = small_tmpfs["too-big"]
    assert seen["refused"] is not None and "kv.slab" in seen["refused"], seen
    assert not seen["slab_exists"]


def test_a_file_system_filled_after_the_slab_was_preallocated_costs_it_nothing(
    small_tmpfs: dict[str, dict[str, Any]],
) -> None:
    seen = small_tmpfs["preallocated"]
    assert seen["filler_bytes"] > 0  # the file system did fill up
    assert seen["enabled"] and seen["num_errors"] == 0 and seen["warnings"] == []
    assert seen["on_disk"] == list(range(1, 9)) and seen["exact"]


def test_a_sparse_slab_on_a_full_file_system_disables_the_tier_and_keeps_what_it_holds(
    small_tmpfs: dict[str, dict[str, Any]],
) -> None:
    seen = small_tmpfs["sparse"]
    assert seen["filler_bytes"] > 0
    assert not seen["enabled"] and seen["num_errors"] > 0
    assert any("disabled: disk full" in w for w in seen["warnings"]), seen
    assert seen["on_disk"][:2] == [1, 2] and seen["exact"]  # written before it filled
