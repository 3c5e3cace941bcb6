"""Who gets in, and how much they may send: `kvflow serve` and `kvflow router` as real
processes on loopback, through the official `openai` client and raw httpx.

- Both bind loopback by default (the peer service too: `test_peer_pull.py` checks that
  binding elsewhere without a secret is refused).
- `--api-key` (or `KVFLOW_API_KEY`) is needed on every endpoint but /health: 401
  otherwise, with OpenAI's error body; the router checks its own and sends it on.
- Keys and peer proofs are compared with `hmac.compare_digest` (constant time).
- A body past `--max-body-bytes` is answered 413, a request past
  `--max-concurrent-requests` 429 with Retry-After, each with a message that says why.
"""

from __future__ import annotations

import hmac
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from kvflow.cli import build_parser
from kvflow.config import PeerConfig
from kvflow.peer import identity
from kvflow.serve.limits import HTTPGuard, HTTPLimits
from tests.serve_process import ServerProcess

MODEL = "kvflow-sim"
KEY = "sk-test-4f9c2d"
SIM = ["--engine", "sim", "--set", "sim.preset=null", "--set", "sim.fixed_ms=2"]
ROUTER = ("-m", "kvflow", "router")


def listening_addresses(port: int) -> set[str]:
    """The local addresses of this machine's TCP sockets listening on `port` (Linux)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_everything_binds_loopback_by_default(tmp_path: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    assert parser.parse_args(["router", "--instance", "http://127.0.0.1:1"]).host == "127.0.0.1"
    assert PeerConfig().host == "127.0.0.1"
    with ServerProcess(SIM, tmp_path / "serve.log") as server:  # no --host
        assert listening_addresses(server.port) == {"127.0.0.1"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    with ServerProcess([*SIM, "--api-key", KEY], log) as server:
        yield server


def test_the_api_key_is_needed_on_every_endpoint_but_health(keyed: ServerProcess) -> None:
    url = keyed.base_url
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/no/such/route"),
        ):
            answer = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=10)
            assert answer.status_code == 401, (path, headers, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "invalid_api_key" and "--api-key" in error["message"]
            assert answer.headers["www-authenticate"] == "Bearer"
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/metrics", headers=auth, timeout=10).status_code == 200
    assert (
        httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30).status_code == 200
    )


def test_the_openai_client_gets_in_with_the_key_only(keyed: ServerProcess) -> None:
    base = f"{keyed.base_url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="not-the-key", max_retries=0).models.list()
    client = openai.OpenAI(base_url=base, api_key=KEY, timeout=30)
    out = client.completions.create(model=MODEL, prompt="one two", max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
    )
    assert [c for c in chat if c.choices and c.choices[0].finish_reason == "length"]


def test_the_key_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVFLOW_API_KEY", KEY)
    with ServerProcess(SIM, tmp_path / "serve.log") as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{server.base_url}/v1", api_key="x", max_retries=0
            ).models.list()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY)
        assert [m.id for m in client.models.list().data] == [MODEL]


def test_the_router_checks_its_key_and_sends_it_on(keyed: ServerProcess, tmp_path: Path) -> None:
    args = ["--instance", keyed.base_url, "--api-key", KEY, "--health-interval", "0.05"]
    with ServerProcess(args, tmp_path / "router.log", program=ROUTER) as router:
        base = f"{router.base_url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{router.base_url}/metrics", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=base, api_key=KEY, timeout=30)
        # Its scrapes of the instance's /metrics carry the key: the instance stays in.
        auth = {"Authorization": f"Bearer {KEY}"}
        healthy = f'kvflow:router_instance_healthy{{instance="{keyed.base_url}"}} 1.0'
        deadline = time.monotonic() + 20
        while healthy not in httpx.get(f"{router.base_url}/metrics", headers=auth).text:
            assert time.monotonic() < deadline, "the instance never joined the rotation"
            time.sleep(0.05)
        time.sleep(0.3)  # several scrapes later, still in the rotation
        assert healthy in httpx.get(f"{router.base_url}/metrics", headers=auth).text
        out = client.completions.create(model=MODEL, prompt="one two", max_tokens=3)
        assert out.choices[0].finish_reason == "length"


def test_an_empty_key_is_refused(tmp_path: Path) -> None:
    from tests.cluster_process import kvflow

    done = kvflow("serve", "--engine", "sim", "--api-key", " ", timeout_s=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "kvflow: error: --api-key is empty: give a key, or leave it out to serve without one"
    )


def test_a_body_past_the_limit_is_413_and_read_no_further(tmp_path: Path) -> None:
    with ServerProcess([*SIM, "--max-body-bytes", "1000"], tmp_path / "serve.log") as server:
        url = f"{server.base_url}/v1/completions"
        ok = {"model": MODEL, "prompt": "a " * 100, "max_tokens": 1}
        assert httpx.post(url, json=ok, timeout=30).status_code == 200
        big = {"model": MODEL, "prompt": "a " * 1000, "max_tokens": 1}
        answer = httpx.post(url, json=big, timeout=30)
        assert answer.status_code == 413
        error = answer.json()["error"]
        assert error["code"] == "request_too_large"
        assert (
            "larger than 1000 bytes" in error["message"] and "--max-body-bytes" in error["message"]
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            yield b'{"model": "kvflow-sim", "prompt": "'
            for _ in range(100):
                yield b"a " * 100
            yield b'"}'

        answer = httpx.post(url, content=chunks(), timeout=30)
        assert answer.status_code == 413
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        # Refused before the app, counted as it counts its own refusals.
        assert server.metric("kvflow:request_rejected_total", status="413") == 2


def test_requests_past_the_concurrency_limit_get_429(tmp_path: Path) -> None:
    args = [*SIM, "--max-concurrent-requests", "2", "--set", "scheduler.max_model_len=100000"]
    with ServerProcess(args, tmp_path / "serve.log") as server:
        url = f"{server.base_url}/v1/completions"
        long = {"model": MODEL, "prompt": "a", "max_tokens": 50000, "stream": True}
        with (
            httpx.stream("POST", url, json=long, timeout=30) as first,
            httpx.stream("POST", url, json=long, timeout=30) as second,
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            lines = first.iter_lines(), second.iter_lines()  # kept: dropped ones close
            assert all(next(it).startswith("data: ") for it in lines)  # both streaming now
            short = {"model": MODEL, "prompt": "a", "max_tokens": 2}
            answer = httpx.post(url, json=short, timeout=30)
            assert answer.status_code == 429
            assert answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["code"] == "too_many_requests"
            assert "--max-concurrent-requests 2" in error["message"]
            assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
            assert server.metric("kvflow:request_rejected_total", status="429") == 1
        # The streams closed: their places are free again.
        deadline = time.monotonic() + 20
        while (status := httpx.post(url, json=short, timeout=30).status_code) == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status == 200


def test_keys_and_peer_proofs_are_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both comparisons go through `hmac.compare_digest`, whose time does not depend on
    where the first difference is (seen here by the calls it gets)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert identity.proof_matches(b"x" * 32, b"x" * 32)
    assert calls == [(b"x" * 32, b"x" * 32)]
    calls.clear()

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("a request without the right key reached the app")

    guard = HTTPGuard(app, HTTPLimits(api_key=KEY))
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/v1/models", "method": "GET"}
    headers = [(b"authorization", b"Bearer " + KEY[:-1].encode() + b"X")]
    anyio.run(guard, {**scope, "headers": headers}, receive, send)  # type: ignore[arg-type]
    assert calls == [(KEY[:-1].encode() + b"X", KEY.encode())]
    assert sent[0]["status"] == 401


def test_a_subscriber_too_far_behind_is_dropped_at_the_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that subscribes to block events and stops reading is disconnected once the
    frames queued for it pass `SUBSCRIBER_QUEUE_BYTES` (small socket buffers here, so
    the queue fills after a few hundred kB of events); the service serves on."""
    from kvflow.peer import service as service_module
    from kvflow.peer import wire as wire_module
    from kvflow.peer.frames import FrameKind, pack_header
    from kvflow.peer.handshake import client_handshake
    from kvflow.peer.service import PeerService
    from tests.peer_builders import make_store, peer_config, put_blocks

    monkeypatch.setattr(wire_module, "SOCKET_BUFFER_BYTES", 4096)
    monkeypatch.setattr(service_module, "SUBSCRIBER_QUEUE_BYTES", 16 * 2**10)
    a, b = make_store(tmp_path, "a", num_blocks=1000), make_store(tmp_path, "b")
    config = peer_config()
    me = PeerService(b, config, peer_id="B").identity

    async def run() -> int:
        async with PeerService(a, config, peer_id="A") as service:
            sock = socket.create_connection(("127.0.0.1", service.port))
            wire = wire_module.Wire(sock, config.max_frame_bytes)
            await client_handshake(wire, me, config)
            await wire.send([pack_header(FrameKind.RESYNC, 0, 0)], time.monotonic() + 5)
            with anyio.fail_after(60):
                for _ in range(3000):  # until it is subscribed
                    if service.stats().num_subscribers:
                        break
                    await anyio.sleep(0.01)
                for cycle in range(1, 500):  # never read: stored and dropped, over and over
                    put_blocks(a, "cpu", list(range(cycle * 1000, cycle * 1000 + 1000)))
                    assert a.cpu is not None
                    a.cpu.reset_prefix_cache()
                    await anyio.sleep(0.02)
                    if service.stats().num_subscribers == 0:
                        break
            assert service.stats().num_subscribers == 0, "the subscriber was never dropped"
            wire.close()
            return cycle

    # A few cycles of events (~16 kB each), long before 256 queued frames (~90 cycles).
    assert anyio.run(run) <= 20
    a.close()
    b.close()
