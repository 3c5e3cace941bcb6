"""Sizes are checked before memory is spent: a tier the machine cannot hold is an error
naming the key, the value, the bytes it would take and the bytes available."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pytest

from kvflow.config import ConfigError, KVFlowConfig
from kvflow.kv.block_pool import BlockPool
from kvflow.kv.capacity import available_ram_bytes
from kvflow.kv.store import KVStore

TINY_LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}


def numbers_in(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) bytes", message)]


def billion_or_more() -> int:
    """10**9 blocks, or more on a machine whose RAM would hold their bookkeeping."""
    return max(10**9, 4 * available_ram_bytes() // BlockPool.BYTES_PER_BLOCK)


def test_a_billion_simulated_blocks_are_refused_before_the_bookkeeping_is_allocated() -> None:
    num_blocks = billion_or_more()
    config = KVFlowConfig.from_dict({}, {"kv.device.num_blocks": num_blocks}).kv
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as err:
            KVStore(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # refused, not allocated (unchanged code took 23.5 GB)
    message = str(err.value)
    assert f"kv.device.num_blocks={num_blocks} needs" in message
    needed, available = numbers_in(message)
    assert needed >= num_blocks * 65 and available < needed
    assert "bookkeeping" in message and "RAM available" in message


def test_the_bookkeeping_of_every_tier_adds_up() -> None:
    n = billion_or_more()
    config = KVFlowConfig.from_dict(
        {},
        {"kv.device.num_blocks": 10, "kv.cpu.num_blocks": n, "kv.disk.num_blocks": n},
    ).kv
    with pytest.raises(ConfigError, match=rf"kv\.cpu\.num_blocks={n} \(\d+ bytes\), "):
        KVStore(config)


def test_sizes_a_machine_holds_pass(tmp_path: Path) -> None:
    config = KVFlowConfig.from_dict(
        {},
        {
            "kv.device.num_blocks": 4096,
            "kv.cpu.num_blocks": 100_000,
            "kv.disk.num_blocks": 1_000_000,
            "kv.disk.path": str(tmp_path / "kv.slab"),
        },
    ).kv
    store = KVStore(config)  # the simulator: bookkeeping only, well under 1 GB
    assert store.device.num_blocks == 4096


@pytest.mark.parametrize(
    ("setting", "value", "key"),
    [
        ("kv.cpu.num_blocks", 2**30, "kv.cpu.num_blocks=1073741824"),
        ("kv.cpu.size_mib", 2.0**40, "kv.cpu.size_mib=1099511627776.0"),
    ],
)
def test_a_cpu_tier_larger_than_ram_is_refused_before_allocating(
    setting: str, value: float, key: str
) -> None:
    config = KVFlowConfig.from_dict({}, {setting: value}).kv
    with pytest.raises(ConfigError) as err:
        KVStore.with_tensors(config)
    message = str(err.value)
    assert key in message and "RAM available" in message
    *needs, available = numbers_in(message)
    assert sum(needs) > available


def test_a_device_tier_on_the_cpu_is_checked_against_ram() -> None:
    config = KVFlowConfig.from_dict({}, {"kv.device.num_blocks": 2**30}).kv
    with pytest.raises(ConfigError, match=r"kv\.device\.num_blocks=1073741824 \(\d+ bytes\)"):
        KVStore.with_tensors(config, device="cpu")


def test_a_device_tier_larger_than_the_gpu_is_refused() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (checked on a GPU machine)")
    free, _ = torch.cuda.mem_get_info()
    config = KVFlowConfig.from_dict({}, {"kv.layout.dtype": "float16"}).kv
    num_blocks = free // config.bytes_per_block() + 1
    config = KVFlowConfig.from_dict({}, {"kv.device.num_blocks": num_blocks}).kv
    with pytest.raises(ConfigError, match=r"device memory; \d+ bytes .* free on cuda"):
        KVStore.with_tensors(config, device="cuda")


def test_a_slab_larger_than_the_free_disk_is_refused_and_nothing_is_created(
    tmp_path: Path,
) -> None:
    from kvflow.kv.storage import DiskStorage

    path = tmp_path / "sub" / "kv.slab"
    config = KVFlowConfig.from_dict(
        {},
        {"kv.cpu.num_blocks": 4, "kv.disk.num_blocks": 2**40, "kv.disk.path": str(path)},
    ).kv
    with pytest.raises(ConfigError) as err:
        disk = DiskStorage.create(config, config.tier_blocks("disk"))
        disk.close()  # unchanged code got here
    message = str(err.value)
    assert "kv.disk.num_blocks=1099511627776 needs" in message
    assert f"disk space for {str(path)!r}" in message and "free there" in message
    needed, free = numbers_in(message)
    assert needed > free
    assert not path.exists()


def test_an_absurd_size_is_named_without_hundreds_of_digits() -> None:
    config = KVFlowConfig.from_dict({}, {"kv.cpu.size_mib": 1e300}).kv
    with pytest.raises(ConfigError) as err:
        KVStore(config)
    message = str(err.value)
    assert "kv.cpu.size_mib=1e+300" in message and "RAM available" in message
    assert len(message) < 400, message
