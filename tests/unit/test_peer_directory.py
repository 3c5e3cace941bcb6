"""The directory of who holds what, against a model of peers whose true key sets are
known at every event number: whatever order, loss, duplication, gaps and restarts the
frames suffer, the directory only ever claims what a peer held at one moment of one
incarnation, and a resync brings it back to the truth."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvflow.kv.location import PrefixLocation
from kvflow.kv.store import KVStore
from kvflow.peer.directory import Directory, RunHint
from kvflow.peer.frames import KeyRecord, SeqFrame
from tests.builders import make_config

TIERS = ("device", "cpu", "disk")
INC_A, INC_B = b"a" * 16, b"b" * 16


def frame(inc: bytes, seq: int, *records: tuple[str, str, list[int]]) -> SeqFrame:
    return SeqFrame(
        inc, seq, tuple(KeyRecord(k, t, np.array(keys, dtype=np.uint64)) for k, t, keys in records)
    )


def test_events_in_order_then_a_gap_waits_for_a_resync() -> None:
    d = Directory(heartbeat_timeout_s=5)
    assert d.apply_events("p", frame(INC_A, 1, ("stored", "cpu", [1])), 0) == "ignored"
    assert d.apply_resync("p", frame(INC_A, 1, ("stored", "cpu", [1, 2])), 0) == "applied"
    assert d.apply_events("p", frame(INC_A, 2, ("stored", "disk", [3])), 0) == "applied"
    assert d.apply_events("p", frame(INC_A, 2, ("stored", "disk", [4])), 0) == "duplicate"
    assert d.apply_events("p", frame(INC_A, 4, ("dropped", "cpu", [1])), 0) == "gap"
    assert d.needs_resync("p") and d.num_gaps == 1
    assert d.held("p") == {1: {"cpu"}, 2: {"cpu"}, 3: {"disk"}}  # as of batch 2
    assert d.apply_resync("p", frame(INC_A, 4, ("stored", "cpu", [2])), 0) == "applied"
    assert d.held("p") == {2: {"cpu"}}


def test_a_heartbeat_past_the_last_batch_is_a_gap() -> None:
    d = Directory(heartbeat_timeout_s=5)
    d.apply_resync("p", frame(INC_A, 3), 0)
    assert d.heartbeat("p", frame(INC_A, 3), 1) == "applied"
    assert not d.needs_resync("p")
    assert d.heartbeat("p", frame(INC_A, 4), 2) == "gap"
    assert d.needs_resync("p")


def test_a_new_incarnation_discards_the_old_entries() -> None:
    d = Directory(heartbeat_timeout_s=5)
    d.apply_resync("p", frame(INC_A, 7, ("stored", "cpu", [1, 2])), 0)
    assert d.heartbeat("p", frame(INC_B, 0), 1) == "applied"
    assert d.held("p") == {} and d.needs_resync("p") and d.num_restarts == 1
    assert d.longest_run([1, 2]) is None


def test_a_silent_peer_is_marked_down_and_forgotten() -> None:
    d = Directory(heartbeat_timeout_s=5)
    d.apply_resync("p", frame(INC_A, 0, ("stored", "cpu", [1])), 0)
    d.apply_resync("q", frame(INC_B, 0, ("stored", "cpu", [1])), 0)
    d.heartbeat("q", frame(INC_B, 0), 4)
    assert d.expire(6) == ["p"]
    assert d.peers() == ["q"]
    assert d.longest_run([1]) == RunHint("q", 1, "cpu")


def test_longest_run_prefers_longer_then_faster_runs() -> None:
    d = Directory(heartbeat_timeout_s=5)
    d.apply_resync("p", frame(INC_A, 0, ("stored", "disk", [1, 2, 3])), 0)
    d.apply_resync("q", frame(INC_B, 0, ("stored", "cpu", [1, 2]), ("stored", "device", [3])), 0)
    d.apply_resync("r", frame(b"r" * 16, 0, ("stored", "device", [1, 2])), 0)
    assert d.longest_run([1, 2, 3, 4]) == RunHint("q", 3, "cpu")
    assert d.longest_run([1, 2, 3], start=2) == RunHint("q", 1, "device")
    assert d.longest_run([9]) is None


class DirectoryMachine(RuleBasedStateMachine):
    """Two peers change their key sets and publish batches, heartbeats and snapshots;
    the frames are delivered in any order, any number of times, or never."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Directory(heartbeat_timeout_s=10)
        self.now = 0.0
        self.peers = ("p0", "p1")
        self.inc = {p: bytes([i]) * 16 for i, p in enumerate(self.peers)}
        self.num_restarts = 0
        self.seq = dict.fromkeys(self.peers, 0)
        self.state: dict[str, dict[int, set[str]]] = {p: {} for p in self.peers}
        self.pending: dict[str, list[tuple[str, str, list[int]]]] = {p: [] for p in self.peers}
        # (incarnation, seq) -> what the peer held after that batch
        self.history: dict[tuple[bytes, int], dict[int, frozenset[str]]] = {}
        self.outbox: list[tuple[str, str, SeqFrame]] = []
        for p in self.peers:
            self._record(p)

    def _snapshot(self, p: str) -> dict[int, frozenset[str]]:
        return {k: frozenset(t) for k, t in self.state[p].items() if t}

    def _record(self, p: str) -> None:
        self.history[(self.inc[p], self.seq[p])] = self._snapshot(p)

    @rule(p=st.sampled_from(("p0", "p1")), key=st.integers(0, 11), tier=st.sampled_from(TIERS))
    def store(self, p: str, key: int, tier: str) -> None:
        self.state[p].setdefault(key, set()).add(tier)
        self.pending[p].append(("stored", tier, [key]))

    @rule(p=st.sampled_from(("p0", "p1")), key=st.integers(0, 11), tier=st.sampled_from(TIERS))
    def drop(self, p: str, key: int, tier: str) -> None:
        if tier in self.state[p].get(key, set()):
            self.state[p][key].discard(tier)
            self.pending[p].append(("dropped", tier, [key]))

    @rule(p=st.sampled_from(("p0", "p1")))
    def flush(self, p: str) -> None:
        if self.pending[p]:
            self.seq[p] += 1
            batch = frame(self.inc[p], self.seq[p], *self.pending[p])
            self.pending[p] = []
            self._record(p)
            self.outbox.append(("events", p, batch))

    @rule(p=st.sampled_from(("p0", "p1")))
    def heartbeat(self, p: str) -> None:
        self.outbox.append(("heartbeat", p, frame(self.inc[p], self.seq[p])))

    @rule(p=st.sampled_from(("p0", "p1")))
    def snapshot(self, p: str) -> None:
        self.flush(p)
        by_tier = {t: [k for k, ts in self.state[p].items() if t in ts] for t in TIERS}
        records = [("stored", t, sorted(keys)) for t, keys in by_tier.items()]
        self.outbox.append(("resync", p, frame(self.inc[p], self.seq[p], *records)))

    @precondition(lambda self: self.outbox)
    @rule(index=st.integers(0, 1000), keep=st.booleans(), dt=st.floats(0, 3))
    def deliver(self, index: int, keep: bool, dt: float) -> None:
        """Deliver any frame produced so far; `keep` leaves it to be delivered again."""
        self.now += dt
        i = index % len(self.outbox)
        kind, p, f = self.outbox[i]
        if not keep:
            del self.outbox[i]
        apply = {
            "events": self.directory.apply_events,
            "resync": self.directory.apply_resync,
            "heartbeat": self.directory.heartbeat,
        }[kind]
        apply(p, f, self.now)

    @precondition(lambda self: self.outbox)
    @rule(index=st.integers(0, 1000))
    def lose(self, index: int) -> None:
        del self.outbox[index % len(self.outbox)]

    @rule(p=st.sampled_from(("p0", "p1")), warm=st.booleans())
    def restart(self, p: str, warm: bool) -> None:
        """A new process: a new incarnation, numbering from 0, keeping (warm) what its
        disk held or nothing."""
        self.num_restarts += 1
        self.inc[p] = bytes([self.num_restarts, *p.encode()]) * 4 + b"\0" * 4
        self.seq[p] = 0
        self.pending[p] = []
        if warm:
            self.state[p] = {k: ts & {"disk"} for k, ts in self.state[p].items()}
        else:
            self.state[p] = {}
        self._record(p)

    @rule(dt=st.floats(0, 15))
    def expire(self, dt: float) -> None:
        self.now += dt
        self.directory.expire(self.now)

    @rule(p=st.sampled_from(("p0", "p1")))
    def resync_now(self, p: str) -> None:
        """A fresh snapshot delivered at once brings the entries to the truth."""
        self.snapshot(p)
        _, _, f = self.outbox.pop()
        self.directory.apply_resync(p, f, self.now)
        assert self.directory.held(p) == self._snapshot(p)
        assert not self.directory.needs_resync(p)

    @invariant()
    def entries_are_a_true_past_state(self) -> None:
        for p in self.directory.peers():
            entries = self.directory._peers[p]
            held = self.directory.held(p)
            if entries.last_seq < 0:
                assert held == {}
                continue
            truth = self.history[(entries.incarnation, entries.last_seq)]
            assert held == truth, (p, entries.last_seq)

    @invariant()
    def runs_only_cover_claimed_keys(self) -> None:
        keys = list(range(12))
        hint = self.directory.longest_run(keys)
        if hint is not None:
            held = self.directory.held(hint.peer)
            assert all(k in held for k in keys[: hint.num_blocks])


DirectoryMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
TestDirectoryMachine = DirectoryMachine.TestCase


def test_a_store_locates_the_run_a_peer_holds_after_its_own_tiers() -> None:
    store = KVStore(make_config(**{"kv.cpu.num_blocks": 8, "kv.block_size": 4}).kv)
    for pool, key in ((store.device, 1), (store.cpu, 2)):
        assert pool is not None
        slots = pool.allocate(1)
        pool.seal_many(slots, [key])
        pool.release(slots)
    directory = Directory(heartbeat_timeout_s=5)
    directory.apply_resync(
        "A", frame(INC_A, 0, ("stored", "disk", [3, 4]), ("stored", "cpu", [2])), 0
    )
    directory.apply_resync("B", frame(INC_B, 0, ("stored", "cpu", [3])), 0)
    assert store.locate([1, 2, 3, 4, 5]) == PrefixLocation(device_tokens=4, cpu_tokens=4)
    store.remote = directory
    assert store.locate([1, 2, 3, 4, 5]) == PrefixLocation(
        device_tokens=4, cpu_tokens=4, peer_tokens=8, peer="A"
    )
    assert store.locate([9, 1]) == PrefixLocation()
    assert store.locate([1, 2]) == PrefixLocation(device_tokens=4, cpu_tokens=4)
