"""The disk tier on a real, small file system that fills up: `python -m
tests.disk_tmpfs_process DIR`, run where it may mount (the test runs it in a user and
mount namespace), mounts a fresh 64 KiB tmpfs at DIR/CASE for each case and prints one
JSON line per case of what it saw (`{"case": ..., ...}`; exit status 77 when it cannot
mount).

Cases:
- `too-big`: a slab larger than the file system is refused before it is created;
- `preallocated`: a slab that fits is preallocated, so filling the file system with
  another file afterwards costs it nothing: every block is written and read back whole;
- `sparse`: without `posix_fallocate` (as on macOS) the slab is sparse, so a full file
  system fails its writes with a real ENOSPC: the tier is disabled with a warning, the
  failures are counted, and the blocks written before stay readable, byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from kvflow.kv.capacity import CapacityError
from tests.disk_builders import compute_block, load_from_disk, open_store


def fill(directory: Path) -> int:
    """Write a file until the file system is full; its size."""
    num_bytes = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                num_bytes += f.write(chunk) or 0
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                return num_bytes


def main(directory: Path, case: str) -> dict[str, Any]:
    slab = directory / "kv.slab"
    if case == "too-big":
        try:
            open_store(slab, persist=False, num_blocks=1024).close()
        except CapacityError as err:
            return {"refused": str(err), "slab_exists": slab.exists()}
        return {"refused": None}
    if case == "sparse":
        del os.posix_fallocate  # the last case: the process ends after it
    store = open_store(slab, persist=False)
    assert store.disk_storage is not None
    before = {key: compute_block(store, key) for key in (1, 2)}
    filler_bytes = fill(directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = {key: compute_block(store, key) for key in range(3, 9)}
    written = {**before, **after}
    disk, cpu = store.disk, store.cpu
    assert disk is not None and cpu is not None
    cpu.reset_prefix_cache()  # so that each block comes back from disk
    read_back = {key: load_from_disk(store, key) for key in written if disk.lookup(key) is not None}
    result = {
        "filler_bytes": filler_bytes,
        "enabled": store.disk_storage.enabled,
        "num_errors": store.disk_storage.num_errors,
        "on_disk": sorted(read_back),
        "exact": all(
            data is not None and torch.equal(data, written[key]) for key, data in read_back.items()
        ),
        "warnings": [str(w.message) for w in caught],
    }
    store.close()
    return result


CASES = ("too-big", "preallocated", "sparse")
TMPFS_BYTES = 64 * 1024


if __name__ == "__main__":
    for name in CASES:
        mount = Path(sys.argv[1]) / name
        mount.mkdir()
        options = f"size={TMPFS_BYTES}"
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "kvflow", str(mount)])
        if mounted.returncode != 0:
            sys.exit(77)
        print(json.dumps({"case": name, **main(mount, name)}), flush=True)
