"""A peer service in its own process, for tests that kill or stop it:
`python -m tests.peer_process DIR NUM_BLOCKS SEED` caches NUM_BLOCKS blocks (keys
1..NUM_BLOCKS, contents from SEED, as `put_blocks` makes them) in a store's cpu tier,
serves them on loopback and prints `{"port": P}` once listening."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

from kvflow.peer.service import PeerService
from tests.peer_builders import make_store, peer_config, put_blocks


async def main(directory: Path, num_blocks: int, seed: int) -> None:
    store = make_store(directory, "served", num_blocks=num_blocks)
    put_blocks(store, "cpu", list(range(1, num_blocks + 1)), seed=seed)
    async with PeerService(store, peer_config(), peer_id="A") as service:
        print(json.dumps({"port": service.port}), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
