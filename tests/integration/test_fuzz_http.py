"""Fuzzing the HTTP API's request bodies: completions and chat bodies with hostile field
values (huge, negative, NaN, wrong types), unknown fields, broken JSON, raw bytes and
oversized bodies. In process (the app behind its guard, on the simulated engine) for
thousands of cases, then a smaller run against a real `kvflow serve --engine sim`.

Only documented answers come out: 200 with a well-formed response, or 400 / 404 / 405 /
413 with an OpenAI error body whose message says why; never a 500, a traceback in the
server's log, or a hang. Requests with empty prompts, token ids outside the vocabulary,
zero or huge `max_tokens` and absurd sampling values are refused naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from starlette.testclient import TestClient

from kvflow.serve.app import build_app
from kvflow.serve.host import EngineHost, ServeOptions
from kvflow.serve.limits import HTTPGuard, HTTPLimits
from tests.cluster_process import wait_until
from tests.fuzz_helpers import (
    ODD_FLOATS,
    ODD_INTS,
    deeply_nested,
    json_values,
    no_hang,
    peak_rss_bytes,
    reset_peak_rss,
)
from tests.guarantee_settings import examples, scaled
from tests.serve_process import ServerProcess

MODEL = "kvflow-sim"
MAX_MODEL_LEN = 256
MAX_BODY = 64 * 2**10
SETTINGS = {"sim.preset": None, "sim.fixed_ms": 0, "scheduler.max_model_len": MAX_MODEL_LEN}
SIM_ARGS = [f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.items()]
DOCUMENTED = {200, 400, 404, 405, 413}
NUM_CASES = 400

odd_numbers = st.sampled_from(ODD_INTS) | st.sampled_from(ODD_FLOATS) | st.integers(-3, 300)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy, odd_numbers, json_values)


token_lists = st.lists(st.integers(0, 300) | st.sampled_from(ODD_INTS), max_size=8)
COMMON = {
    "max_tokens": st.integers(1, 8) | st.none(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**31),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(max_size=4), max_size=2),
    "stop_token_ids": token_lists,
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.just(0.0),
    "priority": st.integers(-3, 3),
    "tenant": st.text(max_size=4),
    "ttft_slo_ms": st.floats(1, 1e4),
    "deadline_s": st.floats(0.01, 100),
    "user": st.text(max_size=4),
}
COMPLETION = {
    **COMMON,
    "prompt": st.text(max_size=30)
    | token_lists
    | st.lists(st.text(max_size=10), max_size=3)
    | st.lists(token_lists, max_size=3),
    "echo": st.booleans(),
    "logprobs": st.none() | st.integers(0, 3),
}
CHAT = {
    **COMMON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=4)},
            optional={"content": st.text(max_size=30) | st.none(), "name": st.text(max_size=3)},
        ),
        max_size=3,
    ),
    "max_completion_tokens": st.integers(1, 8),
    "logprobs": st.booleans(),
}


def bodies(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    model = st.just(MODEL) | st.text(max_size=5)
    required = {
        "model": maybe(model),
        **{k: maybe(v) for k, v in fields.items() if k in ("prompt", "messages")},
    }
    optional = {k: maybe(v) for k, v in fields.items() if k not in required}
    extra = st.dictionaries(st.text(max_size=5), json_values, max_size=1)
    return st.builds(
        lambda base, more: {**base, **more},
        st.fixed_dictionaries(required, optional=optional),
        st.just({}) | st.just({}) | extra,
    )


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body) of one request."""
    kind = draw(st.sampled_from(["completion", "chat", "completion", "chat", "raw", "path"]))
    if kind == "raw":
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
        raw = draw(
            st.binary(max_size=200)
            | st.sampled_from([b"", b"null", b"[]", b"{", deeply_nested(20_000).encode()])
            | st.just(b'{"model": "kvflow-sim", "prompt": "' + b"x" * (MAX_BODY + 1) + b'"}')
        )
        return "POST", path, raw
    if kind == "path":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
        path = draw(st.sampled_from(["/v1/completions", "/v1/models", "/v2/x", "/", "/health"]))
        return method, path, b"{}"
    body = draw(bodies(COMPLETION if kind == "completion" else CHAT))
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    return "POST", path, json.dumps(body, allow_nan=True).encode()


def check_answer(status: int, headers: Mapping[str, str], content: bytes) -> int:
    """The answer is one of the documented ones, well formed. Returns the status."""
    assert status in DOCUMENTED, f"status {status}: {content[:300]!r}"
    event(f"status {status}")
    if status == 200 and "text/event-stream" in headers.get("content-type", ""):
        events = [line for line in content.decode().split("\n\n") if line.strip()]
        assert events[-1] == "data: [DONE]", events[-3:]
        for item in events[:-1]:
            doc = json.loads(item.removeprefix("data: "))
            assert "error" not in doc, doc
        return status
    doc = json.loads(content)
    if status == 200:
        assert isinstance(doc, dict) and ("choices" in doc or "data" in doc or "status" in doc)
        return status
    error = doc["error"]
    assert isinstance(error["message"], str) and error["message"], doc
    assert isinstance(error["type"], str) and "Traceback" not in error["message"]
    return status


@pytest.fixture(scope="module")
def app_client() -> Iterator[TestClient]:
    host = EngineHost(ServeOptions(engine="sim", settings=dict(SETTINGS)))
    app = HTTPGuard(build_app(host), HTTPLimits(max_body_bytes=MAX_BODY))
    with TestClient(app, raise_server_exceptions=True) as client:
        wait_until("the app healthy", lambda: client.get("/health").status_code == 200)
        yield client


def fuzz_in_process(client: TestClient, slow: bool) -> None:
    num_cases = 0
    seen: set[int] = set()
    before = reset_peak_rss()

    @examples(scaled(NUM_CASES, slow), slow=slow)
    @given(request=requests())
    def case(request: tuple[str, str, bytes]) -> None:
        nonlocal num_cases
        num_cases += 1
        method, path, body = request
        with no_hang(30):
            answer = client.request(method, path, content=body)
        seen.add(check_answer(answer.status_code, answer.headers, answer.content))

    case()
    assert num_cases >= scaled(NUM_CASES, slow)
    assert seen == DOCUMENTED, f"only {sorted(seen)} seen: the cases miss some answers"
    growth = peak_rss_bytes() - before
    assert growth < 256 * 2**20, f"peak memory grew {growth} B over {num_cases} cases"
    print(f"HTTP fuzz in process: {num_cases} cases")
    assert client.get("/health").status_code == 200


def test_fuzzed_bodies_get_documented_answers_in_process(app_client: TestClient) -> None:
    fuzz_in_process(app_client, slow=False)


@pytest.mark.slow
def test_fuzzed_bodies_get_documented_answers_in_process_slow(app_client: TestClient) -> None:
    fuzz_in_process(app_client, slow=True)


def test_fuzzed_bodies_get_documented_answers_from_a_real_server(tmp_path: Path) -> None:
    args = ["--engine", "sim", *SIM_ARGS, "--max-body-bytes", str(MAX_BODY)]
    with (
        ServerProcess(args, tmp_path / "serve.log") as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        num_cases = 0

        @examples(60)
        @given(request=requests())
        def case(request: tuple[str, str, bytes]) -> None:
            nonlocal num_cases
            num_cases += 1
            method, path, body = request
            answer = http.request(method, path, content=body)
            check_answer(answer.status_code, answer.headers, answer.content)

        case()
        assert num_cases >= 60
        assert http.get("/health").status_code == 200
        log = server.log()
    assert "Traceback" not in log and "Exception" not in log, log[-2000:]


@pytest.mark.parametrize(
    ("fields", "param", "quoted"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", ""),
        ({"prompt": [1, -1]}, "prompt", "-1"),
        ({"prompt": [1, 2**32]}, "prompt", str(2**32)),
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"max_tokens": 10**30}, "max_tokens", str(10**30)),
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", str(MAX_MODEL_LEN)),
        ({"temperature": -1}, "temperature", "-1"),
        ({"temperature": 1e308}, "temperature", "1e+308"),
        ({"top_p": 0}, "top_p", "0"),
        ({"top_p": 2}, "top_p", "2"),
        ({"top_k": -2}, "top_k", "-2"),
        ({"logprobs": 10**9}, "logprobs", str(10**9)),
        ({"stop_token_ids": [-5]}, "stop_token_ids", "-5"),
        ({"ttft_slo_ms": 0}, "ttft_slo_ms", "0"),
        ({"deadline_s": -1}, "deadline_s", "-1"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    app_client: TestClient, fields: dict[str, Any], param: str, quoted: str
) -> None:
    body = {"model": MODEL, "prompt": "a b", **fields}
    answer = app_client.post("/v1/completions", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] is None or error["param"].startswith(param)
    assert param in error["message"] and quoted in error["message"], error


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "ttft_slo_ms", "deadline_s"])
def test_non_finite_numbers_are_refused_naming_the_field(
    app_client: TestClient, field: str, value: str
) -> None:
    raw = f'{{"model": "{MODEL}", "prompt": "a b", "{field}": {value}}}'
    answer = app_client.post("/v1/completions", content=raw)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["error"]["message"]
