"""`kvflow serve --engine sim` as a process on loopback, through the official `openai`
client and raw httpx: the API's shapes, kvflow's body fields, back-pressure, a client
that goes away, and shutdown on SIGTERM."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvflow.cli import main
from kvflow.kv.block_pool import BlockPool
from kvflow.kv.capacity import available_ram_bytes
from tests.serve_process import ServerProcess

MODEL = "kvflow-sim"
# Steps of 2 ms in real time, so requests take long enough to be caught in flight.
SIM = ["--set", "sim.preset=null", "--set", "sim.fixed_ms=2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-sim") / "serve.log"
    args = ["--engine", "sim", *SIM, "--set", "scheduler.max_model_len=1024"]
    with ServerProcess(args, log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=30.0)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_counts_prompt_words_and_generates_max_tokens(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    assert out.choices[0].finish_reason == "length"
    assert re.fullmatch(r"(tok\d+ ){5}", out.choices[0].text)
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 5)
    assert out.usage.total_tokens == 8


def test_a_batch_of_prompts_gets_one_choice_each(client: openai.OpenAI) -> None:
    for batch, num_prompt in ((["one two", "three four five"], 5), ([[5, 6], [7, 8, 9]], 5)):
        out = client.completions.create(model=MODEL, prompt=batch, max_tokens=3)
        assert [c.index for c in out.choices] == [0, 1]
        for choice in out.choices:
            assert re.fullmatch(r"(tok\d+ ){3}", choice.text) and choice.finish_reason == "length"
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (num_prompt, 6)
    with pytest.raises(openai.BadRequestError) as caught:  # an empty one names its index
        client.completions.create(model=MODEL, prompt=[[5, 6], []], max_tokens=3)
    assert "prompt[1] is empty" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, stream=True)
    assert "streaming a batch of 2 prompts is not supported" in str(caught.value)


def test_token_id_prompt_is_taken_as_is(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=2)
    assert out.usage is not None and out.usage.prompt_tokens == 4


def test_chat_streams_role_then_text_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert re.fullmatch(r"(tok\d+ ){4}", text)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == 3  # "user:", "hello", "assistant:"


def test_a_stop_string_ends_the_output_before_it(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="a b", max_tokens=50, stop=[" tok"])
    assert re.fullmatch(r"tok\d+", out.choices[0].text)
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="a b", max_tokens=50, stop=" tok", stream=True
    )
    chunks = list(streamed)
    assert re.fullmatch(r"tok\d+", "".join(c.choices[0].text for c in chunks))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_kvflow_fields_are_accepted_and_checked(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "prompt": "x y",
        "max_tokens": 2,
        "priority": 3,
        "tenant": "team-a",
        "ttft_slo_ms": 500,
        "tpot_slo_ms": 50,
        "deadline_s": 2.5,
    }
    ok = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(
        f"{server.base_url}/v1/completions", json={**body, "ttft_slo_ms": -1}, timeout=30
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "ttft_slo_ms"
    assert "-1" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ('{"model": "kvflow-sim", "prompt": ', 400, None),
        ('{"model": "other", "prompt": "x"}', 404, "model"),
        ('{"model": "kvflow-sim", "prompt": "x", "n": 2}', 400, "n"),
        ('{"model": "kvflow-sim", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ('{"model": "kvflow-sim", "prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
        ('{"model": "kvflow-sim", "prompt": "x", "max_tokens": 1024}', 400, "max_tokens"),
        ('{"model": "kvflow-sim", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
        ("[1, 2]", 400, None),
        (
            '{"model": "kvflow-sim", "prompt": "x", "repetition_penalty": 1.2}',
            400,
            "repetition_penalty",
        ),
        ('{"model": "kvflow-sim", "prompt": "x", "best_of": 2}', 400, "best_of"),
        # OpenAI and vLLM refuse stream_options without stream (it asks for a stream's usage)
        (
            '{"model": "kvflow-sim", "prompt": "x", "stream_options": {"include_usage": true}}',
            400,
            "stream_options",
        ),
        (
            '{"model": "kvflow-sim", "prompt": "x", "stop_token_ids": [3, -1]}',
            400,
            "stop_token_ids",
        ),
        (
            '{"model": "kvflow-sim", "prompt": "x", "presence_penalty": 0.5}',
            400,
            "presence_penalty",
        ),
        (
            '{"model": "kvflow-sim", "prompt": "x", "repetition_penalty": 1.0, "best_of": 1,'
            ' "min_tokens": 0, "logit_bias": {}, "logprobs": null, "user": "u"}',
            200,
            None,
        ),
    ],
)
def test_bad_requests_get_openai_error_bodies(
    server: ServerProcess, body: str, status: int, param: str | None
) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    if status == 200:  # neutral values of fields kvflow does not implement are taken
        return
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "echo": None, "logprobs": None}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": None},
        ),
    ],
)
def test_null_means_the_default_as_openai_and_vllm_take_it(
    server: ServerProcess, path: str, body: dict[str, object]
) -> None:
    """OpenAI's schema makes these fields nullable (vLLM's too): null is the default."""
    nulls = dict.fromkeys(
        [
            "temperature",
            "top_p",
            "top_k",
            "n",
            "stream",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "stop",
            "seed",
        ]
    )
    full = {"model": MODEL, "max_tokens": 2, **body, **nulls}
    r = httpx.post(f"{server.base_url}{path}", json=full, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_logprobs_are_a_400_naming_the_engine(client: openai.OpenAI) -> None:
    # The simulator has no distribution to report: no made-up values.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=0)
    assert "not supported by engine 'sim'" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, logprobs=True
        )
    assert "not supported by engine 'sim'" in str(caught.value)


def test_too_long_prompt_names_max_model_len_and_the_lengths(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[7] * 1020, max_tokens=5)
    message = str(caught.value)
    assert "max_model_len is 1024" in message and "1025" in message and "1020" in message


def test_a_client_leaving_mid_stream_aborts_its_request(server: ServerProcess) -> None:
    aborted = server.metric("kvflow:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "p q r", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept: a discarded iterator closes the response
        for _ in range(3):
            next(line for line in lines if line.startswith("data: {"))
        assert server.metric("kvflow:num_requests_running") == 1
    server.wait_for_metric("kvflow:num_requests_running", 0)
    server.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")
    server.wait_for_metric("kvflow:request_success_total", aborted + 1, finished_reason="abort")


def test_a_client_leaving_a_plain_request_aborts_it(server: ServerProcess) -> None:
    aborted = server.metric("kvflow:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "p q r", "max_tokens": 1000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.5)
    server.wait_for_metric("kvflow:num_requests_running", 0)
    server.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")
    server.wait_for_metric("kvflow:request_success_total", aborted + 1, finished_reason="abort")


def test_metrics_count_tokens_and_latencies(server: ServerProcess, client: openai.OpenAI) -> None:
    before = server.metric("kvflow:generation_tokens_total")
    ttft_before = server.metric("kvflow:time_to_first_token_seconds_count")
    client.completions.create(model=MODEL, prompt="m n", max_tokens=7)
    assert server.metric("kvflow:generation_tokens_total") == before + 7
    assert server.metric("kvflow:time_to_first_token_seconds_count") == ttft_before + 1
    assert server.metric("kvflow:kv_blocks_total", tier="device") == 4096


def test_a_shared_prefix_is_reported_as_cached(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    prefix = " ".join(f"w{i}" for i in range(64))
    first = client.completions.create(model=MODEL, prompt=prefix + " one", max_tokens=2)
    hits = server.metric("kvflow:prefix_cache_hits_total")
    second = client.completions.create(model=MODEL, prompt=prefix + " two", max_tokens=2)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 64  # 4 blocks of 16
    assert server.metric("kvflow:prefix_cache_hits_total") == hits + 64


def test_priority_policy_and_back_pressure_behind_the_server(tmp_path: Path) -> None:
    """One request at a time, 3 in flight at most: a fourth is refused with 503 and
    Retry-After; of two queued requests the more important (lower priority) goes first."""
    args = ["--engine", "sim", "--policy", "priority", "--max-num-pending", "3"]
    args += ["--set", "sim.preset=null", "--set", "sim.fixed_ms=10"]
    args += ["--set", "scheduler.max_num_seqs=1", "--set", "kv.device.num_blocks=64"]
    with ServerProcess(args, tmp_path / "serve.log") as server:
        url = f"{server.base_url}/v1/completions"
        # 64 blocks of 16 tokens hold 1024: the engine rejects a longer request at once.
        too_big = httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 1500})
        assert too_big.status_code == 400
        assert "the device tier holds 64" in too_big.json()["error"]["message"]
        done: list[str] = []

        def send(name: str, priority: int) -> None:
            body = {"model": MODEL, "prompt": name, "max_tokens": 3, "priority": priority}
            assert httpx.post(url, json=body, timeout=60).status_code == 200
            done.append(name)

        body = {"model": MODEL, "prompt": "first", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=60) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            threads = []
            for name, priority in (("low", 5), ("high", 0)):
                t = threading.Thread(target=send, args=(name, priority))
                t.start()
                threads.append(t)
                server.wait_for_metric("kvflow:num_requests_waiting", len(threads))
            refused = httpx.post(url, json={"model": MODEL, "prompt": "x"}, timeout=30)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "capacity" in refused.json()["error"]["message"]
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert rest[-1]["choices"][0]["finish_reason"] == "length"
        for t in threads:
            t.join(timeout=60)
        assert done == ["high", "low"]


@pytest.mark.parametrize(("on_close", "reason"), [("drain", "length"), ("abort", "abort")])
def test_sigterm_drains_or_aborts_then_exits_0(tmp_path: Path, on_close: str, reason: str) -> None:
    args = ["--engine", "sim", "--on-close", on_close, *SIM]
    with ServerProcess(args, tmp_path / "serve.log") as server:
        body = {"model": MODEL, "prompt": "p", "max_tokens": 300, "stream": True}
        url = f"{server.base_url}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(15)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the listener closes: no new connection
                try:
                    health = httpx.get(f"{server.base_url}/health", timeout=1).status_code
                except httpx.TransportError:
                    break
                if health == 503:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("/health still answered 200 10 s after SIGTERM")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == reason
        assert server.proc.wait(timeout=60) == 0, server.log()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "torch"], "--engine torch needs --model DIR"),
        (["--engine", "hf", "--model", "/nonexistent/model"], "'/nonexistent/model'"),
        (["--set", "scheduler.max_num_seqs=0"], "scheduler.max_num_seqs=0"),
        (["--policy", "nope"], "'nope' is not a known policy"),
        (["--port", "70000"], "70000"),
    ],
)
def test_bad_serve_arguments_fail_before_serving(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    try:
        status = main(["serve", *args])
    except SystemExit as exit_:  # argparse's own errors
        status = int(str(exit_.code))
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_model_that_fails_to_load_exits_1_with_the_reason(tmp_path: Path) -> None:
    args = ["--engine", "sim", "--set", "sim.preset_file=/nonexistent/preset.json"]
    proc = ServerProcess(args, tmp_path / "serve.log")
    try:
        assert proc.proc.wait(timeout=120) == 1
    finally:
        proc.kill()
    log = proc.log()
    assert "kvflow: error: " in log and "/nonexistent/preset.json" in log, log
    assert "Traceback" not in log


def test_a_store_the_machine_cannot_hold_exits_1_with_the_reason(tmp_path: Path) -> None:
    # The engine's store is built after the runner loaded: a failure there, too, ends
    # the server instead of leaving it answering "loading" forever.
    n = max(10**9, 4 * available_ram_bytes() // BlockPool.BYTES_PER_BLOCK)
    proc = ServerProcess(["--set", f"kv.device.num_blocks={n}"], tmp_path / "serve.log")
    try:
        assert proc.proc.wait(timeout=120) == 1, proc.log()
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvflow serve still running 120 s after its store failed:\n{proc.log()}")
    finally:
        proc.kill()
    log = proc.log()
    assert "Traceback" not in log, log
    assert f"kvflow: error: kv.device.num_blocks={n} needs" in log, log


FAULTY_SERVE = '''
"""kvflow serve whose simulated runner raises, as a failing device would, in any step
of a request whose prompt starts with token 13 once it has 2 output tokens."""
import sys

from kvflow.cli import main
from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner

execute = RealTimeSimRunner.execute


def failing(self, plan):
    if any(r.token_ids[0] == 13 and r.num_output_tokens >= 2 for r in plan.requests):
        raise RuntimeError("injected device fault")
    return execute(self, plan)


RealTimeSimRunner.execute = failing
sys.exit(main(["serve", *sys.argv[1:]]))
'''


def test_a_runner_error_fails_its_request_with_500_and_the_server_serves_on(
    tmp_path: Path,
) -> None:
    script = tmp_path / "faulty_serve.py"
    script.write_text(FAULTY_SERVE)
    with ServerProcess(SIM, tmp_path / "serve.log", program=[str(script)]) as server:
        url = f"{server.base_url}/v1/completions"
        body = {"model": MODEL, "prompt": [13, 1, 2], "max_tokens": 10}
        failed = httpx.post(url, json=body, timeout=30)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "engine_error" and "injected device fault" in error["message"]
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200  # the failure comes after the first tokens
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "injected device fault" in json.loads(events[-2][6:])["error"]["message"]
        ok = httpx.post(url, json={**body, "prompt": [7, 1, 2]}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        assert server.metric("kvflow:request_success_total", finished_reason="error") == 2
        server.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")
