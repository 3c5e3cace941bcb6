"""Peer pulls over loopback TCP beside a raw socket moving the same bytes, and the
copy model fitted to them.

For 1, 4, 16 and 64 MiB of blocks: the time of one `PeerClient.pull` from a running
`PeerService` (request, re-validation at the owner, the blocks' bytes straight from the
owner's cpu tier into the puller's, xxh3 of every block verified as it lands) beside a
raw loopback TCP connection sending the same block buffers with `sendmsg` into the same
destination with `recv_into`, each end one thread waiting in `poll`, with the same
socket buffer sizes (`kvflow.peer.wire.SOCKET_BUFFER_BYTES`). Peer and raw transfers
alternate, in pairs whose order alternates too; each size prints the best of each, the
median of the pairs' ratios, and the first pull's time (the owner hashes a block the
first time it serves it and remembers its checksum: later pulls of it are not hashed
at the owner, only at the puller). Then the latency of a one-block pull (p50, p99).
With `--cpu-bursts N`, the process CPU per pull at each end beside the raw copy's
(`p2p_cpu_per_pull_ms`: alternating bursts, medians of each burst's ratio). Then the
virtual-time copy model (`SimCopyEngine`, direction `peer_to_cpu`) with
`kv.transfer.peer_gbps` and `peer_latency_us` fitted to the measured pull times (the
median of each size; the line with the smallest worst relative error), beside them.

The owner (its store, peer service, and the raw baseline's sender, which answers an
8-byte request with the blocks as a pull does) runs in a child process, the puller in
this one, as two instances would: in one process the two ends' threads fight for one
GIL, and a sender thread that drops and retakes it between sends starves the other.

Both ends run their event loop as `kvflow serve` does: uvloop when it is installed
(`--loop asyncio` for the standard loop).

    python benchmarks/p2p_bandwidth.py [--repeat 7] [--pulls 1000] [--loop uvloop|asyncio]
        [--cpu-bursts 30]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from kvflow.config import KVFlowConfig, PeerConfig, TransferConfig
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore
from kvflow.kv.transfer import PEER_DIRECTION, SimCopyEngine
from kvflow.peer.client import PeerClient, connect_peer, slot_views
from kvflow.peer.service import PeerService
from kvflow.peer.wire import recv_views_blocking, send_views_blocking, tune

MIB = 2**20
LAYOUT = {"num_layers": 4, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
"""16-token blocks of 256 KiB (a 4-layer slice of Llama-3-8B's KV)."""


def make_store(directory: Path, name: str, num_blocks: int) -> KVStore:
    kv = KVFlowConfig.from_dict(
        {
            "kv": {
                "block_size": 16,
                "layout": LAYOUT,
                "device": {"num_blocks": 1},
                "cpu": {"num_blocks": num_blocks},
                "disk": {"num_blocks": 0, "path": str(directory / f"{name}.slab")},
            }
        }
    ).kv
    return KVStore.with_tensors(kv)


def fill(store: KVStore, keys: list[int]) -> None:
    import torch

    assert store.cpu is not None and store.cpu_storage is not None
    slots = store.cpu.allocate(len(keys))
    data = store.cpu_storage.data
    data[slots] = torch.randn(data[slots].shape, dtype=torch.float32).to(data.dtype)
    store.cpu.seal_many(slots, keys)
    store.cpu.release(slots)


def serve_raw(listener: socket.socket, src: list[memoryview]) -> None:
    """The raw baseline's owner: for each 8-byte count received, send that many blocks."""
    conn, _ = listener.accept()
    tune(conn)
    request = memoryview(bytearray(8))
    while True:
        try:
            recv_views_blocking(conn, [request], time.monotonic() + 3600)
        except ConnectionError:
            return
        n = int.from_bytes(request, "big")
        send_views_blocking(conn, list(src[:n]), time.monotonic() + 60)


async def owner(args: argparse.Namespace) -> None:
    """The owner's process: a store holding the blocks, its peer service, and the raw
    baseline's sender; prints both ports, then serves until killed."""
    with tempfile.TemporaryDirectory() as tmp:
        num_blocks = args.owner
        a = make_store(Path(tmp), "a", num_blocks)
        fill(a, list(range(1, num_blocks + 1)))
        assert a.cpu is not None and a.cpu_storage is not None
        slots = [a.cpu.lookup(k) for k in range(1, num_blocks + 1)]
        src = slot_views(byte_view(a.cpu_storage.data), slots, a.bytes_per_block)  # type: ignore[arg-type]
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=serve_raw, args=(listener, src), daemon=True).start()
        async with PeerService(a, PeerConfig(pull_timeout_s=60), peer_id="A") as service:
            ports = {"peer": service.port, "raw": listener.getsockname()[1]}
            print(json.dumps(ports), flush=True)
            await anyio.sleep_forever()


def raw_transfer(sock: socket.socket, dst: list[memoryview]) -> float:
    """Ask the raw owner for `len(dst)` blocks and receive them, as a pull does."""
    deadline = time.monotonic() + 60
    t0 = time.perf_counter()
    send_views_blocking(sock, [memoryview(len(dst).to_bytes(8, "big"))], deadline)
    recv_views_blocking(sock, dst, deadline)
    return time.perf_counter() - t0


async def peer_transfer(client: PeerClient, keys: list[int], dst: list[memoryview]) -> float:
    t0 = time.perf_counter()
    result = await client.pull(keys, dst)
    elapsed = time.perf_counter() - t0
    if result.num_blocks != len(keys):
        raise RuntimeError(f"pulled {result.num_blocks} of {len(keys)} blocks")
    return elapsed


def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        b = make_store(Path(tmp), "b", max(sizes) * 4)
        keys = list(range(1, max(sizes) * MIB // b.bytes_per_block + 1))
        child = subprocess.Popen(
            [sys.executable, __file__, "--owner", str(len(keys)), "--loop", args.loop],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            ports = json.loads(child.stdout.readline())
            run_loop(measure, args.loop, args, sizes, b, keys, ports, child.pid)
        finally:
            child.kill()
            child.wait()
            b.close()


async def measure(
    args: argparse.Namespace,
    sizes: list[int],
    b: KVStore,
    keys: list[int],
    ports: dict[str, int],
    owner_pid: int,
) -> None:
    size = b.bytes_per_block
    assert b.cpu_storage is not None
    dst_all = slot_views(byte_view(b.cpu_storage.data), range(len(keys)), size)
    config = PeerConfig(pull_timeout_s=60)
    me = PeerService(b, config, peer_id="B").identity
    raw = socket.create_connection(("127.0.0.1", ports["raw"]))
    tune(raw)
    measured: dict[int, float] = {}
    async with connect_peer("127.0.0.1", ports["peer"], me, config) as client:
        for mib in sizes:
            n = mib * MIB // size
            peer_times: list[float] = []
            raw_times: list[float] = []
            for i in range(args.repeat):  # pairs, in alternating order
                if i % 2:
                    raw_times.append(raw_transfer(raw, dst_all[:n]))
                peer_times.append(await peer_transfer(client, keys[:n], dst_all[:n]))
                if not i % 2:
                    raw_times.append(raw_transfer(raw, dst_all[:n]))
            measured[mib] = statistics.median(peer_times)
            best_peer, best_raw = min(peer_times), min(raw_times)
            ratios = [r / p for p, r in zip(peer_times, raw_times, strict=True)]
            print(
                json.dumps(
                    {
                        "figure": "p2p_pull_throughput",
                        "mib": mib,
                        "num_blocks": n,
                        "peer_gb_s_best": round(n * size / best_peer / 1e9, 3),
                        "raw_gb_s_best": round(n * size / best_raw / 1e9, 3),
                        "ratio_best": round(best_raw / best_peer, 3),
                        "ratio_median": round(statistics.median(ratios), 3),
                        "peer_ms_median": round(statistics.median(peer_times) * 1e3, 3),
                        "raw_ms_median": round(statistics.median(raw_times) * 1e3, 3),
                        "peer_ms_first": round(peer_times[0] * 1e3, 3),
                        "repeat": args.repeat,
                        "loop": args.loop,
                    }
                ),
                flush=True,
            )
        for mib in sizes[: len(sizes) if args.cpu_bursts else 0]:
            n = mib * MIB // size
            figure = await cpu_per_pull(client, raw, keys[:n], dst_all[:n], args, owner_pid)
            print(json.dumps({"figure": "p2p_cpu_per_pull_ms", "mib": mib, **figure}), flush=True)
        one = [await peer_transfer(client, keys[:1], dst_all[:1]) for _ in range(args.pulls)]
    raw.close()
    one_ms = np.array(one) * 1e3
    print(
        json.dumps(
            {
                "figure": "p2p_one_block_pull_ms",
                "bytes_per_block": size,
                "p50": round(float(np.percentile(one_ms, 50)), 4),
                "p99": round(float(np.percentile(one_ms, 99)), 4),
                "pulls": args.pulls,
            }
        ),
        flush=True,
    )
    print_model(measured)


def process_cpu_s(pid: int) -> float:
    """CPU time of every thread of process `pid` so far (Linux: /proc schedstat, ns)."""
    stats = glob.glob(f"/proc/{pid}/task/*/schedstat")
    return sum(int(Path(f).read_text().split()[0]) for f in stats) / 1e9


async def cpu_per_pull(
    client: PeerClient,
    raw: socket.socket,
    keys: list[int],
    dst: list[memoryview],
    args: argparse.Namespace,
    owner_pid: int,
) -> dict[str, float | int]:
    """Process CPU per transfer at the owner and at the puller, peer pulls against the
    raw copy, in bursts that alternate (and alternate which goes first): the medians of
    each, and of each burst's peer/raw ratio (less sensitive to other jobs' load than
    wall time, which waits for a core)."""
    per_burst = max(3, 16 * MIB // (len(keys) * len(dst[0])))
    bursts: list[dict[str, tuple[float, float]]] = []
    for i in range(args.cpu_bursts):
        burst = {}
        for what in ("peer", "raw") if i % 2 == 0 else ("raw", "peer"):
            owner0, puller0 = process_cpu_s(owner_pid), time.process_time()
            for _ in range(per_burst):
                if what == "peer":
                    await peer_transfer(client, keys, dst)
                else:
                    raw_transfer(raw, dst)
            owner = (process_cpu_s(owner_pid) - owner0) / per_burst * 1e3
            burst[what] = (owner, (time.process_time() - puller0) / per_burst * 1e3)
        bursts.append(burst)

    def median(value: Callable[[dict[str, tuple[float, float]]], float]) -> float:
        return round(statistics.median(value(b) for b in bursts), 3)

    return {
        "owner_ms": median(lambda b: b["peer"][0]),
        "puller_ms": median(lambda b: b["peer"][1]),
        "raw_owner_ms": median(lambda b: b["raw"][0]),
        "raw_puller_ms": median(lambda b: b["raw"][1]),
        "owner_ratio": median(lambda b: b["peer"][0] / b["raw"][0]),
        "puller_ratio": median(lambda b: b["peer"][1] / b["raw"][1]),
        "both_ratio": median(lambda b: sum(b["peer"]) / sum(b["raw"])),
        "bursts": args.cpu_bursts,
        "per_burst": per_burst,
    }


def fit_copy_model(measured: dict[int, float]) -> tuple[float, float]:
    """`kv.transfer.peer_latency_us` and `peer_gbps` whose `latency + bytes / bandwidth`
    is closest to the measured pull times in the worst case: the line minimising the
    largest relative error over the sizes (a small linear program)."""
    from scipy.optimize import linprog

    mib = np.array(list(measured), dtype=float)
    ms = np.array(list(measured.values())) * 1e3
    # Variables: latency (ms), ms per MiB, the largest relative error e; minimise e
    # subject to |latency + mib * slope - ms| <= e * ms at every size.
    ones = np.ones_like(mib)
    a_ub = np.vstack([np.column_stack([ones, mib, -ms]), np.column_stack([-ones, -mib, -ms])])
    b_ub = np.concatenate([ms, -ms])
    bounds = [(0, None), (1e-9, None), (0, None)]
    fit = linprog([0, 0, 1], A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if not fit.success:
        raise RuntimeError(f"fitting the copy model failed: {fit.message}")
    latency_ms, ms_per_mib, _ = fit.x
    return latency_ms * 1e3, MIB / (ms_per_mib * 1e-3) / 1e9


def print_model(measured: dict[int, float]) -> None:
    """Fit latency + bytes / bandwidth to the measured pulls and print the copy model's
    times with those settings beside the measured ones."""
    latency_us, peer_gbps = fit_copy_model(measured)
    model = SimCopyEngine(TransferConfig(peer_gbps=peer_gbps, peer_latency_us=latency_us))
    for mib, seconds in measured.items():
        modelled = model.duration_s(PEER_DIRECTION, mib * MIB)
        print(
            json.dumps(
                {
                    "figure": "p2p_model_vs_measured",
                    "mib": mib,
                    "measured_ms": round(seconds * 1e3, 3),
                    "modelled_ms": round(modelled * 1e3, 3),
                    "error": round(modelled / seconds - 1, 3),
                    "kv.transfer.peer_gbps": round(peer_gbps, 3),
                    "kv.transfer.peer_latency_us": round(latency_us, 1),
                }
            ),
            flush=True,
        )


def run_loop(fn: Callable[..., Awaitable[None]], loop: str, *args: Any) -> None:
    anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--pulls", type=int, default=1000, help="one-block pulls timed")
    parser.add_argument("--sizes-mib", default="1,4,16,64")
    parser.add_argument(
        "--cpu-bursts",
        type=int,
        default=0,
        help="also measure process CPU per pull at both ends against the raw copy's, in "
        "this many alternating bursts per size (Linux)",
    )
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        help="both ends' event loop (default: uvloop when installed, as kvflow serve runs)",
    )
    parser.add_argument("--owner", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.owner:
        run_loop(owner, args.loop, args)
    else:
        run(args)


if __name__ == "__main__":
    main()
