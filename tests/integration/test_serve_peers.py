"""Two real `kvflow serve --engine torch` processes on loopback sharing KV blocks
through their peer services (tiny random Llama, float64): B serves a prompt whose prefix
A computed by pulling A's blocks (no prefill of them on B), with the tokens of computing
it alone; A, stopped and restarted over its persistent disk tier, serves its old
prefixes from disk and B finds them at A again (and nothing of A's old incarnation); a
stalled then killed A leaves B recomputing within the pull timeout, with no leak; a
peer with another model's fingerprint or the wrong secret is refused.

The tests run in file order over one pair of servers: each leaves A as the next expects.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.serve_process import ServerProcess, free_port, serving
from tests.text_model import build_text_model

MODEL = "tiny"
PULL_TIMEOUT_S = 2.0
BLOCK_SIZE = 4
SETTINGS = {
    "kv.block_size": BLOCK_SIZE,
    "kv.device.num_blocks": 256,
    "kv.cpu.num_blocks": 256,
    "kv.load_policy": "always",
    "peer.pull_timeout_s": PULL_TIMEOUT_S,
    "peer.heartbeat_interval_s": 0.2,
    "peer.heartbeat_timeout_s": 30.0,  # a stalled peer is found by its pull timing out
}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "kvflow",
    "schedulers",
    "decide",
]


def prompt(seed: int, num_words: int = 40) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(num_words))


A_DISK_BLOCKS = 40
"""A's persistent disk tier: more blocks than one prompt and its output take (29 or 30),
fewer than two, so the slab keeps all of the last prompt A computed and none of the one
two prompts before it (whatever order the copy workers land a prompt's blocks in)."""


def persistent_disk(slab: Path) -> list[str]:
    """A's disk tier: persistent, written through (every block computed lands on disk)."""
    settings = {
        "kv.disk.num_blocks": A_DISK_BLOCKS,
        "kv.disk.path": slab,
        "kv.disk.persist": "true",
        "kv.write_policy": "write_through",
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def serve_args(model_dir: Path, peer_port: int, peers: list[int], *extra: str) -> list[str]:
    args = ["--engine", "torch", "--model", str(model_dir), "--dtype", "float64"]
    args += ["--served-model-name", MODEL, "--peer-port", str(peer_port)]
    args += ["--peers", ",".join(f"127.0.0.1:{p}" for p in peers)]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def complete(server: ServerProcess, text: str, timeout_s: float = 60.0) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": text, "max_tokens": 8, "temperature": 0.0}
    body["ignore_eos"] = True
    reply = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=timeout_s)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def wait_until(what: str, check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {timeout_s} s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-model")
    build_text_model(path, max_position_embeddings=256)
    return path


@dataclass
class Pair:
    a: ServerProcess
    """Replaced by the tests that restart A."""
    b: ServerProcess
    port_a: int
    port_b: int
    a_args: list[str]
    """A's arguments: with a persistent disk tier."""


@pytest.fixture(scope="module")
def pair(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("serve-peers")
    port_a, port_b = free_port(), free_port()
    a_args = serve_args(model_dir, port_a, [port_b], *persistent_disk(logs / "a.slab"))
    with serving(
        ServerProcess(a_args, logs / "a.log"),
        ServerProcess(serve_args(model_dir, port_b, [port_a]), logs / "b.log"),
    ) as (a, b):
        for server in (a, b):
            wait_until("peers up", lambda s=server: s.metric("kvflow:peers_up") == 1)
        both = Pair(a, b, port_a, port_b, a_args)
        try:
            yield both
        finally:
            both.a.kill()


def peer_hits(server: ServerProcess) -> float:
    return server.metric("kvflow:prefix_cache_hits_by_tier_total", tier="peer")


def test_b_pulls_the_prefix_a_computed(pair: Pair) -> None:
    a, b = pair.a, pair.b
    text = prompt(1)
    keys_before = b.metric("kvflow:peer_directory_keys")
    alone = complete(a, text)  # A computes it alone
    wait_until(
        "A's blocks known at B", lambda: b.metric("kvflow:peer_directory_keys") > keys_before
    )
    assert peer_hits(b) == 0
    pulled = complete(b, text)
    assert pulled["choices"][0]["text"] == alone["choices"][0]["text"]
    num_prompt = pulled["usage"]["prompt_tokens"]
    cached = pulled["usage"]["prompt_tokens_details"]["cached_tokens"]
    # B prefilled only the tokens after the pulled blocks (the last one is always computed).
    assert cached == peer_hits(b) > 0
    assert num_prompt - cached <= 4
    assert b.metric("kvflow:peer_bytes_pulled_total") > 0
    assert b.metric("kvflow:peer_pull_failures_total") == 0
    assert a.metric("kvflow:peer_blocks_served_total") * 4 == cached
    b.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")


def moved(server: ServerProcess, direction: str) -> float:
    return server.metric("kvflow:kv_tier_bytes_moved_total", direction=direction)


def writes_landed(server: ServerProcess) -> bool:
    """Written through: every block the server computed went to cpu, then to disk, and
    no disk write is still in flight (its slot would count as used)."""
    return (
        moved(server, "cpu_to_disk") == moved(server, "device_to_cpu") > 0
        and server.metric("kvflow:kv_blocks_used", tier="disk") == 0
    )


def test_a_restarted_over_its_persistent_disk_is_found_again_at_b(
    pair: Pair, tmp_path: Path
) -> None:
    a, b = pair.a, pair.b
    old, filler, latest = prompt(5), prompt(8), prompt(6)
    # The blocks of one prompt land on disk in whatever order A's copy workers finish
    # them (a block's write can land after all the others'), and the disk tier evicts
    # in that order: each prompt's blocks land before the next prompt starts, so the
    # filler pushes every block of `old` off the slab and `latest` stays whole.
    for text in (old, filler):
        complete(a, text)
        wait_until("A's blocks on disk", lambda: writes_landed(a))
    alone = complete(a, latest)
    wait_until("A's blocks on disk", lambda: writes_landed(a))
    keys_before = b.metric("kvflow:peer_directory_keys")
    assert keys_before > A_DISK_BLOCKS  # A computed more than its disk tier keeps
    assert a.terminate() == 0  # A stops; its slab stays

    restarted = ServerProcess(pair.a_args, tmp_path / "a-restarted.log")
    pair.a = restarted  # the next tests use it; the fixture kills it at the end
    restarted.wait_healthy()
    assert restarted.metric("kvflow:kv_disk_blocks_recovered_total") == A_DISK_BLOCKS
    assert restarted.metric("kvflow:kv_disk_blocks_dropped_total") == 0
    wait_until("A up again at B", lambda: b.metric("kvflow:peers_up") == 1)
    # A's old incarnation's entries are gone; its new one holds what its slab kept.
    wait_until(
        "A's recovered blocks known at B",
        lambda: b.metric("kvflow:peer_directory_keys") == A_DISK_BLOCKS,
    )
    hits, failures = peer_hits(b), b.metric("kvflow:peer_pull_failures_total")
    pulled = complete(b, latest)  # found again at A, on A's disk
    assert pulled["choices"][0]["text"] == alone["choices"][0]["text"]
    cached = pulled["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == peer_hits(b) - hits > 0
    assert pulled["usage"]["prompt_tokens"] - cached <= 4
    assert b.metric("kvflow:peer_pull_failures_total") == failures
    # `old` fell off A's slab: B has no hint of it, so no pull to fail.
    recomputed = complete(b, old)
    assert recomputed["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert peer_hits(b) - hits == cached
    assert b.metric("kvflow:peer_pull_failures_total") == failures
    # A itself serves its old prefix from its disk tier.
    disk_hits = restarted.metric("kvflow:prefix_cache_hits_by_tier_total", tier="disk")
    again = complete(restarted, latest)
    assert again["choices"][0]["text"] == alone["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert (
        restarted.metric("kvflow:prefix_cache_hits_by_tier_total", tier="disk") - disk_hits
        == cached
    )


LONG_WORDS = 70
"""Words of the prompts `a_computes` takes: more blocks than A's disk tier holds."""


def a_computes(pair: Pair, text: str) -> dict[str, Any]:
    """A computes `text` alone; returns its reply once B knows A's new blocks.

    B counts A's keys: A's new blocks add theirs, and each of their writes through to
    A's full disk tier evicts one, which B drops where A held it on disk alone (after a
    restart over its slab, every key until one is loaded). `text` takes more blocks
    than that tier holds, so the count rises whatever an earlier test left on A's slab
    (a restart test failing before A loaded a prefix left B waiting here in vain)."""
    keys = pair.b.metric("kvflow:peer_directory_keys")
    alone = complete(pair.a, text)
    assert alone["usage"]["prompt_tokens"] > A_DISK_BLOCKS * BLOCK_SIZE
    wait_until(
        "A's new blocks known at B", lambda: pair.b.metric("kvflow:peer_directory_keys") > keys
    )
    return alone


def assert_recomputed(b: ServerProcess, reply: dict[str, Any], alone: dict[str, Any]) -> None:
    assert reply["choices"][0]["text"] == alone["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    b.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")
    b.wait_for_metric("kvflow:kv_blocks_used", 0, tier="cpu")


def test_a_stalled_peer_leaves_b_recomputing_after_the_pull_timeout(pair: Pair) -> None:
    a, b = pair.a, pair.b
    alone = a_computes(pair, prompt(2, LONG_WORDS))
    hits, failures = peer_hits(b), b.metric("kvflow:peer_pull_failures_total")
    os.kill(a.proc.pid, signal.SIGSTOP)  # A stalls: B's hints stay, its pull times out
    try:
        started = time.monotonic()
        recomputed = complete(b, prompt(2, LONG_WORDS), timeout_s=PULL_TIMEOUT_S + 30)
        took = time.monotonic() - started
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert_recomputed(b, recomputed, alone)
    assert b.metric("kvflow:peer_pull_failures_total") == failures + 1
    assert peer_hits(b) == hits  # the failed pull's hits were taken back
    assert took >= PULL_TIMEOUT_S  # it waited for the pull's timeout, not forever
    assert "did not answer a pull" in b.log()
    # A resumed: B reconnects and resyncs A's entries.
    wait_until("A up again at B", lambda: b.metric("kvflow:peers_up") == 1)
    wait_until("A's entries back at B", lambda: b.metric("kvflow:peer_directory_keys") > 0)


def test_a_peer_killed_mid_pull_leaves_b_recomputing(pair: Pair) -> None:
    a, b = pair.a, pair.b
    alone = a_computes(pair, prompt(7, LONG_WORDS))
    hits, failures = peer_hits(b), b.metric("kvflow:peer_pull_failures_total")
    pulls = b.metric("kvflow:peer_pulls_total")
    replies: list[dict[str, Any]] = []
    os.kill(a.proc.pid, signal.SIGSTOP)  # holds B's pull in flight until the kill
    try:
        asking = threading.Thread(target=lambda: replies.append(complete(b, prompt(7, LONG_WORDS))))
        asking.start()
        wait_until("B pulling from A", lambda: b.metric("kvflow:peer_pulls_total") > pulls)
    finally:
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=30)
    asking.join(timeout=60)
    assert not asking.is_alive() and len(replies) == 1
    assert_recomputed(b, replies[0], alone)
    assert b.metric("kvflow:peer_pull_failures_total") == failures + 1
    assert peer_hits(b) == hits
    # The pull ended with the connection (the kill), not by its timeout.
    last_down = [line for line in b.log().splitlines() if " is down: " in line][-1]
    assert "did not answer" not in last_down
    assert "closed" in last_down or "lost" in last_down, last_down
    wait_until("A down at B", lambda: b.metric("kvflow:peers_up") == 0)
    # With A dead and its hints gone, B serves the next request by itself.
    again = complete(b, prompt(3))
    assert again["usage"]["completion_tokens"] == 8


def test_a_restarted_empty_peer_attracts_nothing(
    pair: Pair, model_dir: Path, tmp_path: Path
) -> None:
    a, b = pair.a, pair.b
    assert a.proc.poll() is not None  # killed by the test before
    wait_until("A's entries dropped at B", lambda: b.metric("kvflow:peer_directory_keys") == 0)
    args = serve_args(model_dir, pair.port_a, [pair.port_b])  # no disk tier: empty
    with ServerProcess(args, tmp_path / "a2.log") as restarted:
        wait_until("A up again at B", lambda: b.metric("kvflow:peers_up") == 1)
        wait_until("B up at A", lambda: restarted.metric("kvflow:peers_up") == 1)
        assert b.metric("kvflow:peer_directory_keys") == 0  # a new, empty incarnation
        hits = peer_hits(b)
        complete(b, prompt(2, LONG_WORDS))  # A computed it before it died: nothing to pull now
        assert peer_hits(b) == hits
        alone = complete(restarted, prompt(4))  # a warm restarted peer is found again
        wait_until("A's new blocks known at B", lambda: b.metric("kvflow:peer_directory_keys") > 0)
        pulled = complete(b, prompt(4))
        assert pulled["choices"][0]["text"] == alone["choices"][0]["text"]
        assert peer_hits(b) > hits


@pytest.mark.parametrize("mismatch", ["model", "secret"])
def test_a_peer_of_another_model_or_secret_is_refused(
    pair: Pair, model_dir: Path, tmp_path: Path, mismatch: str
) -> None:
    b, port_b = pair.b, pair.port_b
    served = b.metric("kvflow:peer_blocks_served_total")
    refused = b.metric("kvflow:peer_connections_refused_total")
    extra = ["--model-id", "another-model"]
    if mismatch == "secret":
        (tmp_path / "secret").write_text("not-the-fleet-secret\n")
        extra = ["--peer-secret-file", str(tmp_path / "secret")]
    args = serve_args(model_dir, free_port(), [port_b], *extra)
    with ServerProcess(args, tmp_path / "c.log") as c:
        wait_until("refused by B", lambda: c.metric("kvflow:peer_refused_total") >= 1)
        assert c.metric("kvflow:peers_up") == 0
        assert c.metric("kvflow:peer_directory_keys") == 0
        text = prompt(1)
        complete(c, text)
        assert peer_hits(c) == 0
    assert b.metric("kvflow:peer_connections_refused_total") > refused
    assert b.metric("kvflow:peer_blocks_served_total") == served
