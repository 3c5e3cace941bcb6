"""`kvflow router` over `kvflow serve --engine sim` processes: a request an instance
refuses (503) or cannot take (killed) goes to another instance before any byte was
sent; a killed instance restarted where it was comes back into the rotation; a stream
passes through chunk by chunk, and ends with an error naming the instance (no hang,
nothing held) when its instance dies mid-way; bad flags are errors."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvflow.cli import main
from tests.cluster_process import SIM, wait_until
from tests.serve_process import ServerProcess, app_in_thread, serving

MODEL = "kvflow-sim"
ROUTER = ("-m", "kvflow", "router")


def _router(log: Path, *instances: ServerProcess, interval: str = "60") -> ServerProcess:
    # Health checks a minute apart: the router learns of a failure from the request.
    args = ["--router", "round-robin", "--health-interval", interval]
    for inst in instances:
        args += ["--instance", inst.base_url]
    return ServerProcess(args, log, program=ROUTER)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    # The first takes one request at a time and refuses the next with 503.
    long = ["--set", "scheduler.max_model_len=65536"]
    with serving(
        ServerProcess(
            ["--engine", "sim", *SIM, *long, "--max-num-pending", "1"], tmp_path / "a.log"
        ),
        ServerProcess(["--engine", "sim", *SIM, *long], tmp_path / "b.log"),
    ) as (a, b):
        yield a, b


def _post(url: str, prompt: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


@contextmanager
def _long_stream(router: ServerProcess) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """A stream of 60000 tokens through `router`, its first event read: the instance
    is busy with it. Yields the response and its lines from the second on (keep them:
    a dropped iterator closes the stream)."""
    body = {"model": MODEL, "prompt": "long", "max_tokens": 60000, "stream": True}
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        assert json.loads(first[6:])["choices"][0]["text"].startswith("tok")
        yield r, lines


def test_a_refused_request_goes_to_another_instance(
    two: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    a, b = two
    with _router(tmp_path / "router.log", a, b) as router:
        with _long_stream(router) as (held, _):  # a is busy with it now
            assert held.headers["x-kvflow-instance"] == a.base_url
            assert _post(router.base_url, "x").headers["x-kvflow-instance"] == b.base_url
            again = _post(router.base_url, "y")  # round robin's turn is a's: refused
            assert again.status_code == 200, again.text
            assert again.headers["x-kvflow-instance"] == b.base_url
        assert router.metric("kvflow:router_retries_total", reason="refused") == 1
        assert router.metric("kvflow:router_retries_total", reason="down") == 0


def test_a_killed_instance_s_request_goes_to_another(
    two: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    a, b = two
    with _router(tmp_path / "router.log", a, b) as router:
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=30)
        served = [_post(router.base_url, f"p{i}") for i in range(4)]
        assert [r.status_code for r in served] == [200] * 4
        assert {r.headers["x-kvflow-instance"] for r in served} == {b.base_url}
        down = router.metric("kvflow:router_retries_total", instance=a.base_url)
        assert down == 1  # then out of the rotation: not tried again
        assert httpx.get(f"{router.base_url}/health", timeout=10).status_code == 200
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=30)
        none = _post(router.base_url, "z")
        assert none.status_code == 503
        message = none.json()["error"]["message"]  # which instance failed it, and how
        assert message.startswith("no instance took the request"), message
        assert f"{b.base_url} is down (cannot connect" in message, message
        assert f"{a.base_url} is out of the rotation" in message, message
        none = _post(router.base_url, "z")  # b is out of the rotation now too
        assert none.status_code == 503
        assert "all 2 instances are out of the rotation" in none.json()["error"]["message"]


def test_a_killed_instance_comes_back_into_the_rotation_once_it_answers_again(
    tmp_path: Path,
) -> None:
    args = ["--engine", "sim", *SIM]
    with (
        serving(
            ServerProcess(args, tmp_path / "a.log"), ServerProcess(args, tmp_path / "b.log")
        ) as (a, b),
        _router(tmp_path / "router.log", a, b, interval="0.1") as router,
    ):
        healthy = "kvflow:router_instance_healthy"
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=30)
        wait_until("a out", lambda: router.metric(healthy, instance=a.base_url) == 0)
        served = [_post(router.base_url, f"p{i}") for i in range(3)]
        assert {r.headers["x-kvflow-instance"] for r in served} == {b.base_url}
        with ServerProcess(args, tmp_path / "a-again.log", port=a.port) as again:
            wait_until("a back", lambda: router.metric(healthy, instance=a.base_url) == 1)
            served = [_post(router.base_url, f"q{i}") for i in range(4)]
            assert [r.status_code for r in served] == [200] * 4
            assert {r.headers["x-kvflow-instance"] for r in served} == {a.base_url, b.base_url}
            assert again.metric("kvflow:request_success_total", finished_reason="length") == 2


def test_an_instance_dying_mid_stream_ends_the_stream_with_an_error_naming_it(
    two: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    # As vLLM ends a stream its engine failed: an error event, then [DONE]. A stream
    # that just ended read as a whole answer (the openai client raised nothing).
    _, b = two
    with _router(tmp_path / "router.log", b) as router:
        with _long_stream(router) as (_, lines):
            b.proc.send_signal(signal.SIGKILL)
            rest = [line for line in lines if line]  # ends within the client's timeout
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert b.base_url in error["message"] and error["type"] == "server_error", error
        assert router.metric("kvflow:router_in_flight", instance=b.base_url) == 0
        assert "Traceback" not in router.log(), router.log()
        client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIError, match="no instance took"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True)


class _BreaksOff:
    """An instance that answers /health and /metrics, and breaks off each answer after
    its first bytes: part of a JSON body of a declared length, or an event stream cut
    inside an event."""

    def __init__(self, content_type: bytes) -> None:
        self.content_type = content_type

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] in ("/health", "/metrics"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [(b"content-type", self.content_type)]
        if self.content_type == b"application/json":
            headers.append((b"content-length", b"100"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        part = b'data: {"id": "cmpl-1", "choi'
        await send({"type": "http.response.body", "body": part, "more_body": True})
        raise ConnectionAbortedError("instance gone")  # uvicorn closes the connection


@pytest.mark.parametrize("content_type", [b"application/json", b"text/event-stream"])
def test_an_answer_broken_off_inside_is_cut_short_for_the_client_too(
    content_type: bytes, tmp_path: Path
) -> None:
    # Not ended as if whole (a JSON body short of its length was a traceback in the
    # router's log), and no error event glued onto half an event.
    with app_in_thread(_BreaksOff(content_type)) as url:
        args = ["--router", "round-robin", "--health-interval", "60", "--instance", url]
        with ServerProcess(args, tmp_path / "router.log", program=ROUTER) as router:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=30)
            assert router.metric("kvflow:router_in_flight", instance=url) == 0
            assert "broke off a response" in router.log()
            assert "Traceback" not in router.log(), router.log()


def test_a_client_that_leaves_mid_stream_frees_the_instance(
    two: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    _, b = two
    with _router(tmp_path / "router.log", b) as router:
        with _long_stream(router):
            assert b.metric("kvflow:num_requests_running") == 1
        # The router closes its upstream stream: the instance aborts the request.
        b.wait_for_metric("kvflow:num_requests_running", 0, timeout_s=60)
        assert router.metric("kvflow:router_in_flight", instance=b.base_url) == 0


def test_a_client_that_leaves_before_the_answer_began_frees_the_instance(
    two: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    # A whole answer's head comes when it is done: the instance went on generating
    # 60000 tokens for a client long gone, counted in flight at the router meanwhile.
    _, b = two
    with _router(tmp_path / "router.log", b) as router:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 60000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=1.5)
        b.wait_for_metric("kvflow:num_requests_running", 0, timeout_s=20)
        assert router.metric("kvflow:router_in_flight", instance=b.base_url) == 0
        assert "Traceback" not in router.log(), router.log()
        assert _post(router.base_url, "after").status_code == 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["router", "--instance", "localhost:8001"], "expected a URL like"),
        (["router", "--instance", "http://h:1/v1"], "no path"),
        # The router speaks plain HTTP to its instances: an https:// one would get the
        # requests (and the API key) in the clear, and a TLS port would just fail them.
        (["router", "--instance", "https://h:1"], "plain http://"),
        (["router", "--prefill", "https://h:2", "--instance", "http://h:1"], "plain http://"),
        # Credentials in the URL went into the Host header, not to the instance.
        (["router", "--instance", "http://user:pw@h:1"], "no user or password"),
    ],
)
def test_bad_router_flags_are_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("again", ["http://h:1/", "http://H:1"])
def test_an_instance_given_twice_is_an_error(
    again: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["router", "--instance", "http://h:1", "--instance", again]) == 2
    assert "--instance given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "nope=1"], "nope: unknown key"),
        (["--router", "nope"], "'nope'"),
        (["--model", "/no/such/dir"], "--model '/no/such/dir' is not a directory"),
        (["--peer-secret-file", "/no/such/file"], "--peer-secret-file '/no/such/file'"),
    ],
)
def test_bad_router_settings_are_one_line_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["router", "--instance", "http://h:1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
