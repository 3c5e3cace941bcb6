"""Every request `kvflow serve` is sent is counted once in /metrics, finished
(`request_success`, `abort` for a client that left) or rejected (`request_rejected`, by
status), whenever its client leaves: while the body is still arriving, after the body
but before the first token, or mid-stream. Nothing is held afterwards, and nothing
reaches the server's log as a traceback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.serve_process import ServerProcess

MODEL = "kvflow-sim"
# Steps of 200 ms: a client can leave after its body was read, before the first token.
SLOW = ["--set", "sim.preset=null", "--set", "sim.fixed_ms=200"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-accounting") / "serve.log"
    with ServerProcess(["--engine", "sim", *SLOW], log) as proc:
        proc.tasks_at_rest = proc.metric("kvflow:server_tasks")  # type: ignore[attr-defined]
        yield proc


def _send_raw(
    server: ServerProcess, body: bytes, content_length: int | None = None
) -> socket.socket:
    """A POST /v1/completions written on a raw socket (the response is not read)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    length = len(body) if content_length is None else content_length
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _counted(server: ServerProcess) -> float:
    return server.metric("kvflow:request_success_total") + server.metric(
        "kvflow:request_rejected_total"
    )


def _assert_nothing_held(server: ServerProcess) -> None:
    server.wait_for_metric("kvflow:server_requests_in_flight", 0)
    server.wait_for_metric("kvflow:num_requests_running", 0)
    server.wait_for_metric("kvflow:num_requests_waiting", 0)
    server.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")
    assert "Traceback" not in server.log(), server.log()


def test_a_client_gone_before_its_stream_starts_is_aborted(server: ServerProcess) -> None:
    aborted = server.metric("kvflow:request_success_total", finished_reason="abort")
    counted = _counted(server)
    body = b'{"model": "kvflow-sim", "prompt": [300, 301], "max_tokens": 50, "stream": true}'
    sock = _send_raw(server, body)
    # Its body read and the request submitted (the first step takes 200 ms): a client
    # gone before the server read the body would be a 499, not an abort.
    server.wait_for_metric("kvflow:server_requests_in_flight", 1)
    sock.close()
    server.wait_for_metric("kvflow:request_success_total", aborted + 1, finished_reason="abort")
    assert _counted(server) == counted + 1
    _assert_nothing_held(server)


def test_a_client_gone_while_sending_its_body_is_rejected_499(server: ServerProcess) -> None:
    rejected = server.metric("kvflow:request_rejected_total", status="499")
    counted = _counted(server)
    sock = _send_raw(server, b'{"model": "kvflow-sim", ', content_length=200)
    time.sleep(0.05)
    sock.close()
    server.wait_for_metric("kvflow:request_rejected_total", rejected + 1, status="499")
    assert _counted(server) == counted + 1
    _assert_nothing_held(server)


def test_bad_and_refused_requests_are_counted_by_status(server: ServerProcess) -> None:
    import httpx

    before = {s: server.metric("kvflow:request_rejected_total", status=s) for s in ("400", "404")}
    url = f"{server.base_url}/v1/completions"
    assert httpx.post(url, content=b"{", timeout=10).status_code == 400
    assert httpx.post(url, json={"model": MODEL, "prompt": []}, timeout=10).status_code == 400
    assert httpx.post(url, json={"model": "x", "prompt": [3]}, timeout=10).status_code == 404
    assert server.metric("kvflow:request_rejected_total", status="400") == before["400"] + 2
    assert server.metric("kvflow:request_rejected_total", status="404") == before["404"] + 1
    _assert_nothing_held(server)


def test_after_all_that_the_server_holds_no_more_tasks_than_at_start(
    server: ServerProcess,
) -> None:
    _assert_nothing_held(server)
    at_start = server.tasks_at_rest  # type: ignore[attr-defined]
    assert at_start >= 1  # the scrape's own, at least
    server.wait_for_metric("kvflow:server_tasks", at_start)
    assert server.metric("kvflow:server_threads") >= 1
