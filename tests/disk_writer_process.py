"""A process that writes blocks to a persistent slab until killed:
`python -m tests.disk_writer_process SLAB MAX_BLOCKS` computes blocks with keys 1, 2,
... (contents from `block_data`) and prints each key once its disk copy (bytes and
record) is written; a test SIGKILLs it at some point."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.disk_builders import compute_block, open_store


def main(path: Path, max_blocks: int) -> None:
    store = open_store(path)
    assert store.disk is not None
    for key in range(1, max_blocks + 1):
        compute_block(store, key)
        assert store.disk.lookup(key) is not None, f"block {key} did not reach disk"
        print(key, flush=True)
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
