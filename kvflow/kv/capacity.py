"""Checking a store's sizes against what the machine can hold, before allocating.

Every tier's `num_blocks` (or `size_mib`) costs memory: the block pool's bookkeeping in
RAM (the simulator too), the device tier's tensor in device memory (RAM when the device
is the CPU), the cpu tier's tensor in RAM, the disk tier's slab on its file system. A
size the machine cannot hold is a `CapacityError` naming the key, the value, the bytes
it would take and the bytes available, raised before anything is allocated.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvflow.config import ConfigError, KVConfig
from kvflow.kv.block_pool import BlockPool

if TYPE_CHECKING:
    import torch

TierName = Literal["device", "cpu", "disk"]


class CapacityError(ConfigError):
    """A size the machine cannot hold; names the key, value, bytes needed and available."""


def available_ram_bytes() -> int:
    """RAM that can be allocated without swapping: `MemAvailable` of /proc/meminfo, else
    the free physical pages (`os.sysconf`), else unknown (a very large number)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2**63 - 1


def free_disk_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user) of the file system `path` is or would be on."""
    probe = path
    for _ in range(256):  # bounded: up to the root
        if probe.exists() or probe == probe.parent:
            break
        probe = probe.parent
    return shutil.disk_usage(probe).free


def device_free_bytes(device: str | torch.device) -> tuple[int, str]:
    """Free memory of `device` and where it was read: device memory on CUDA, else RAM."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    return available_ram_bytes(), "RAM available"


def tier_setting(config: KVConfig, tier: TierName) -> str:
    """The setting that sizes `tier`, as `key=value` (`size_mib` when it is set)."""
    section = getattr(config, tier)
    if section.size_mib is not None:
        return f"kv.{tier}.size_mib={section.size_mib!r}"
    return f"kv.{tier}.num_blocks={section.num_blocks!r}"


ABSURD_BYTES = 2**80
"""Past a yobibyte a byte count's digits say nothing: it is written to 3 figures."""


def _count(num_bytes: int) -> str:
    return f"{num_bytes:.3g}" if num_bytes >= ABSURD_BYTES else str(num_bytes)


def human_bytes(num_bytes: int) -> str:
    """`num_bytes` exactly (to 3 figures past `ABSURD_BYTES`), and in GiB/MiB for
    reading."""
    if num_bytes >= ABSURD_BYTES:
        return f"{_count(num_bytes)} bytes"
    if num_bytes >= 2**30:
        return f"{num_bytes} bytes ({num_bytes / 2**30:.1f} GiB)"
    scaled = f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes} bytes ({scaled})"


def check_fits(needs: Sequence[tuple[str, int]], what: str, available: int, where: str) -> None:
    """Raise `CapacityError` unless the bytes of `needs` ((setting, bytes) pairs) fit in
    `available` bytes of `where`.

    Args:
        needs: each setting with the bytes it takes; settings taking 0 are left out.
        what: what the bytes are for ("block bookkeeping in RAM").
    """
    needs = [(setting, n) for setting, n in needs if n > 0]
    total = sum(n for _, n in needs)
    if total <= available:
        return
    if len(needs) == 1:
        ((setting, _),) = needs
        subject = f"{setting} needs"
    else:
        parts = ", ".join(f"{setting} ({_count(n)} bytes)" for setting, n in needs)
        subject = f"{parts} need together"
    raise CapacityError(
        f"{subject} {human_bytes(total)} of {what}; {human_bytes(available)} {where}"
    )


def check_bookkeeping(config: KVConfig) -> None:
    """The block pools' bookkeeping of every configured tier fits in available RAM."""
    needs = [
        (tier_setting(config, tier), BlockPool.bytes_needed(config.tier_blocks(tier)))
        for tier in _enabled_tiers(config)
    ]
    check_fits(needs, "block bookkeeping in RAM", available_ram_bytes(), "RAM available")


def check_fleet_bookkeeping(configs: Sequence[KVConfig]) -> None:
    """The block pools' bookkeeping of every instance of a simulated fleet fits in
    available RAM together (each instance's store checks its own alone)."""
    total = sum(
        BlockPool.bytes_needed(config.tier_blocks(tier))
        for config in configs
        for tier in _enabled_tiers(config)
    )
    settings = ", ".join(tier_setting(configs[0], t) for t in _enabled_tiers(configs[0]))
    what = f"block bookkeeping in RAM (instance 0: {settings})"
    needs = [(f"a fleet of {len(configs)} instances", total)]
    check_fits(needs, what, available_ram_bytes(), "RAM available")


def check_tensors(config: KVConfig, device: str | torch.device) -> None:
    """The device and cpu tiers' tensors and every pool's bookkeeping fit: the device
    tier in the device's free memory (RAM on the CPU), the cpu tier, the bookkeeping and
    the slab's in-memory checksums in available RAM (with the device tier when the
    device is the CPU)."""
    import torch

    block = config.bytes_per_block()
    on_cpu = torch.device(device).type == "cpu"
    device_need = (tier_setting(config, "device"), config.tier_blocks("device") * block)
    tiers = _enabled_tiers(config)
    ram_needs = [
        (f"{tier_setting(config, t)} (bookkeeping)", BlockPool.bytes_needed(config.tier_blocks(t)))
        for t in tiers
    ]
    if "cpu" in tiers:
        ram_needs.append((tier_setting(config, "cpu"), config.tier_blocks("cpu") * block))
    if "disk" in tiers:  # the slab's checksums live in memory: a list slot and an int
        ram_needs.append(
            (f"{tier_setting(config, 'disk')} (checksums)", config.tier_blocks("disk") * 40)
        )
    if on_cpu:
        ram_needs.insert(0, device_need)
    else:
        free, where = device_free_bytes(device)
        check_fits([device_need], "device memory", free, where)
    check_fits(ram_needs, "RAM", available_ram_bytes(), "RAM available")


def check_disk_room(config: KVConfig, path: Path, num_bytes: int) -> None:
    """`num_bytes` more fit on the file system of the slab at `path`."""
    check_fits(
        [(tier_setting(config, "disk"), num_bytes)],
        f"disk space for {str(path)!r}",
        free_disk_bytes(path),
        "free there",
    )


def _enabled_tiers(config: KVConfig) -> list[TierName]:
    """The tiers a store builds: device always, cpu when sized, disk when cpu is too."""
    tiers: list[TierName] = ["device"]
    if config.tier_blocks("cpu"):
        tiers.append("cpu")
        if config.tier_blocks("disk"):
            tiers.append("disk")
    return tiers
