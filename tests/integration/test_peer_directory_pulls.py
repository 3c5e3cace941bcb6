"""Pulls steered by a directory whose frames are dropped, duplicated, delayed past later
ones (even past a restart of the owner) and resynced, over a real peer service and real
stores: whatever the directory believes, a pull lands exactly the leading run of the
hinted keys the owner still holds now, every landed block has its key's bytes, and a
stale hint is a miss. Once frames flow again the directory converges to the owner's
key set. (The directory's own rules are checked without sockets in
tests/unit/test_peer_directory.py.)"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvflow.kv.export import held_keys
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore, TierName
from kvflow.peer.client import PeerClient, connect_peer, pull_into_cpu
from kvflow.peer.directory import Directory
from kvflow.peer.frames import FrameKind, SeqFrame
from kvflow.peer.service import PeerService
from tests.peer_builders import cpu_block, make_store, no_pins, peer_config, until

KEYS = list(range(1, 13))
"""One prompt's chain of block keys; the owner's tiers hold 6 blocks each, so slots are
reused under other keys all the time (a stale hint pointing at a reused slot would
return another key's bytes if the owner did not re-validate)."""
TIERS: tuple[TierName, ...] = ("device", "cpu", "disk")
NUM_BLOCKS = 6


def content(store: KVStore, key: int) -> torch.Tensor:
    """Block `key`'s bytes: distinct for every key and position."""
    assert store.device_storage is not None
    shape = store.device_storage.data.shape[1:]
    return torch.arange(shape.numel(), dtype=torch.float64).reshape(shape) + key * 1e6


def put(store: KVStore, tier: TierName, key: int) -> None:
    """Cache `key` in `tier` (evicting that tier's least recently used block if full)."""
    pool = store._pool(tier)
    if pool.lookup(key) is not None:
        return
    (slot,) = pool.allocate(1)
    data = content(store, key)[None]
    if tier == "disk":
        assert store.disk_storage is not None
        assert all(store.disk_storage.write_from(byte_view(data), [0], [slot]))
    else:
        storage = store.device_storage if tier == "device" else store.cpu_storage
        assert storage is not None
        storage.data[slot] = data[0]
    pool.seal_many([slot], [key])
    pool.release([slot])


def drop(store: KVStore, tier: TierName, key: int) -> None:
    pool = store._pool(tier)
    slot = pool.lookup(key)
    if slot is not None:
        pool.touch([slot], hit=False)
        pool.forget([slot])
        pool.release([slot])


def truth(store: KVStore) -> dict[int, frozenset[str]]:
    """What the owner holds now, as the directory reports it."""
    out: dict[int, set[str]] = {}
    for tier, keys in held_keys(store).items():
        for key in keys.tolist():
            out.setdefault(key, set()).add(tier)
    return {k: frozenset(t) for k, t in out.items()}


class PerturbedFrames:
    """Sits between a client and its directory. Perturbed (the default), it loses,
    duplicates or holds back EVENTS and RESYNC frames, and delivers held ones later,
    after newer ones; partitioned, it holds back every one of them (the directory
    freezes while the owner changes); flowing, it passes them. Heartbeats always pass,
    so a loss is soon found as a gap."""

    def __init__(self, directory: Directory, seed: int) -> None:
        self.directory = directory
        self.rng = random.Random(seed)
        self.mode = "perturbed"
        self.held: list[tuple[Callable[[FrameKind, SeqFrame], bool], FrameKind, SeqFrame]] = []

    def attach(self, client: PeerClient) -> None:
        client.follow(self.directory)
        deliver = client.on_frame
        assert deliver is not None

        def on_frame(kind: FrameKind, frame: SeqFrame) -> bool:
            if kind == FrameKind.HEARTBEAT or self.mode == "flowing":
                return deliver(kind, frame)
            roll = self.rng.random()
            if self.mode == "partitioned" or roll < 0.2:
                self.held.append((deliver, kind, frame))
                return self.directory.needs_resync("A")
            if roll < 0.6 and self.held:  # something held back arrives late
                late = self.held.pop(self.rng.randrange(len(self.held)))
                late[0](late[1], late[2])
            if roll < 0.3:
                return self.directory.needs_resync("A")  # lost
            if roll < 0.4:
                deliver(kind, frame)  # and again below
            return deliver(kind, frame)

        client.on_frame = on_frame

    def release_held(self, keep_fraction: float) -> None:
        """Deliver about `keep_fraction` of the frames held back, in random order (of
        any incarnation), and lose the rest."""
        self.rng.shuffle(self.held)
        for deliver, kind, frame in self.held:
            if self.rng.random() < keep_fraction:
                deliver(kind, frame)
        self.held.clear()


class PullsThroughAStaleDirectory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        path = Path(self.tmp.name)
        self.a = make_store(path, "a", num_blocks=NUM_BLOCKS)
        self.b = make_store(path, "b", num_blocks=len(KEYS))
        self.directory = Directory(heartbeat_timeout_s=30)
        self.config = peer_config(heartbeat_interval_s=0.02)
        self.me = PeerService(self.b, self.config, peer_id="B").identity
        self.portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.service: PeerService | None = None
        self.client: PeerClient | None = None
        self.stop: anyio.Event | None = None

    @initialize(seed=st.integers(0, 2**32 - 1), tier=st.sampled_from(TIERS))
    def start(self, seed: int, tier: TierName) -> None:
        self.frames = PerturbedFrames(self.directory, seed)
        for key in KEYS[:NUM_BLOCKS]:
            put(self.a, tier, key)
        self._start_owner()
        self.frames_flow_and_the_directory_converges()

    def _start_owner(self) -> None:
        """The owner's peer service and the puller's connection to it, on the portal's
        loop until `_stop_owner`."""

        async def run_owner(
            task_status: anyio.abc.TaskStatus[tuple[PeerService, PeerClient, anyio.Event]],
        ) -> None:
            stop = anyio.Event()
            async with (
                PeerService(self.a, self.config, peer_id="A") as service,
                connect_peer("127.0.0.1", service.port, self.me, self.config) as c,
            ):
                self.frames.attach(c)
                await c.subscribe()
                task_status.started((service, c, stop))
                await stop.wait()

        self.owner_future, started = self.portal.start_task(run_owner)
        self.service, self.client, self.stop = started

    def _stop_owner(self) -> None:
        assert self.stop is not None
        self.portal.call(self.stop.set)
        self.owner_future.result(timeout=10)

    def teardown(self) -> None:
        try:
            if self.stop is not None:
                self._stop_owner()
            assert self.portal.call(no_pins, self.a)
        finally:
            self.portal_cm.__exit__(None, None, None)
            self.a.close()
            self.b.close()
            self.tmp.cleanup()

    # -- the owner's store changes ---------------------------------------------------
    @rule(
        tier=st.sampled_from(TIERS),
        first=st.integers(0, len(KEYS) - 1),
        length=st.integers(1, NUM_BLOCKS),
    )
    def store(self, tier: TierName, first: int, length: int) -> None:
        """Cache a run of the chain in one tier (as computing or moving it does)."""
        for key in KEYS[first : first + length]:
            self.portal.call(put, self.a, tier, key)

    @rule(index=st.integers(0, 100), tiers=st.sampled_from([TIERS, *((t,) for t in TIERS)]))
    def drop(self, index: int, tiers: tuple[TierName, ...]) -> None:
        """Drop one of the keys the owner holds, from every tier or from one."""
        held = sorted(self.portal.call(truth, self.a))
        if held:
            for tier in tiers:
                self.portal.call(drop, self.a, tier, held[index % len(held)])

    @rule(warm=st.booleans())
    def restart(self, warm: bool) -> None:
        """The owner's process restarts: a new incarnation, keeping its disk tier (a
        persistent slab) or nothing."""
        self._stop_owner()
        for tier in ("device", "cpu") if warm else TIERS:
            self.portal.call(self.a._pool(tier).reset_prefix_cache)
        self._start_owner()

    @rule(wait_s=st.sampled_from([0.0, 0.01, 0.05]))
    def let_frames_flow(self, wait_s: float) -> None:
        self.portal.call(anyio.sleep, wait_s)

    # -- the puller --------------------------------------------------------------------
    @rule(start=st.integers(0, len(KEYS) - 1), after_s=st.sampled_from([0.0, 0.005, 0.02]))
    def pull_the_hinted_run(self, start: int, after_s: float) -> None:
        """Pull what the directory says the owner holds from `start` on (or, when it
        says nothing, a run anyway), `after_s` after the last change (frames about it
        may have arrived, or not yet)."""
        self.portal.call(anyio.sleep, after_s)
        hint = self.directory.longest_run(KEYS, start)
        keys = KEYS[start : start + (NUM_BLOCKS if hint is None else hint.num_blocks)]
        assert self.client is not None
        num_landed = self.portal.call(self._pull, keys)
        held = truth(self.a)
        expected = next((i for i, k in enumerate(keys) if k not in held), len(keys))
        assert num_landed == expected, (keys, held)
        for key in keys[:num_landed]:
            assert torch.equal(cpu_block(self.b, key), content(self.b, key)), key

    async def _pull(self, keys: list[int]) -> int:
        assert self.b.cpu is not None and self.client is not None
        self.b.cpu.reset_prefix_cache()
        with anyio.fail_after(10):
            return await pull_into_cpu(self.client, self.b, keys)

    @rule()
    def partition(self) -> None:
        self.frames.mode = "partitioned"

    @rule(keep_fraction=st.sampled_from([0.0, 0.5, 1.0]))
    def heal(self, keep_fraction: float) -> None:
        self.portal.call(self.frames.release_held, keep_fraction)
        self.frames.mode = "perturbed"

    @rule()
    def frames_flow_and_the_directory_converges(self) -> None:
        self.frames.mode = "flowing"
        self.portal.call(self.frames.release_held, 1.0)
        self.portal.call(self._converge)
        self.frames.mode = "perturbed"

    async def _converge(self) -> None:
        with anyio.fail_after(10):
            await until(
                lambda: (
                    not self.directory.needs_resync("A")
                    and self.directory.held("A") == truth(self.a)
                )
            )

    @invariant()
    def the_connection_is_up_and_no_lease_outlives_its_pull(self) -> None:
        if self.client is not None:
            assert not self.client.is_down, self.client.down_reason
        if self.service is not None:  # released once the owner has sent the reply
            self.portal.call(self._no_leases, self.service)

    async def _no_leases(self, service: PeerService) -> None:
        with anyio.fail_after(service.config.lease_ttl_s / 2):
            await until(lambda: service.stats().num_active_leases == 0)


PullsThroughAStaleDirectory.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
TestPullsThroughAStaleDirectory = PullsThroughAStaleDirectory.TestCase
