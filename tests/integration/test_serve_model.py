"""`kvflow serve --engine torch` with a tiny random Llama and a tokenizer built here, in
float64, as a process on loopback, through the official `openai` client: text in and
out equals `kvflow.LLM` in-process (greedy), streamed or not; stop strings, usage,
cached prefixes, bad requests, and a client that goes away."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import kvflow
from kvflow.request import SamplingParams
from tests.serve_process import ServerProcess
from tests.text_model import build_text_model

MODEL = "tiny"
SETTINGS = {"kv.block_size": 4, "kv.device.num_blocks": 256}
PROMPT = "The quick brown fox jumps over"
MESSAGES: list[Any] = [{"role": "user", "content": "Café 🚀 schedulers decide"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("text-model")
    return path, build_text_model(path, max_position_embeddings=256)


@pytest.fixture(scope="module")
def server(
    model_dir: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    args = ["--engine", "torch", "--model", str(model_dir[0]), "--dtype", "float64"]
    args += ["--served-model-name", MODEL]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    log = tmp_path_factory.mktemp("serve-model") / "serve.log"
    with ServerProcess(args, log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=60.0)


@pytest.fixture(scope="module")
def llm(model_dir: tuple[Path, Any]) -> Iterator[kvflow.LLM]:
    with kvflow.LLM(model_dir[0], engine="torch", dtype="float64", settings=SETTINGS) as llm:
        yield llm


GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12}
NO_EOS = {"ignore_eos": True}


def test_model_id_keys_a_persistent_disk_tier_without_peers(
    model_dir: tuple[Path, Any], tmp_path: Path
) -> None:
    # Persistence needs the model's identity; --model-id was refused without peers.
    slab = tmp_path / "kv.slab"
    args = ["--engine", "torch", "--model", str(model_dir[0]), "--dtype", "float64"]
    args += ["--model-id", "tiny-v1", "--set", "kv.cpu.num_blocks=16"]
    args += ["--set", "kv.disk.num_blocks=16", "--set", "kv.disk.persist=true"]
    args += ["--set", f"kv.disk.path={slab}", "--set", "kv.block_size=4"]
    with ServerProcess(args, tmp_path / "serve.log") as proc:
        assert slab.stat().st_size > 0
        assert proc.terminate() == 0
    assert slab.exists()  # persistent: kept


def test_health_answers_503_while_the_model_loads(server: ServerProcess) -> None:
    # The socket is bound before the model loads (torch alone takes seconds to import).
    statuses = [status for status, _ in server.health_seen]
    assert statuses[0] == 503 and '"loading"' in server.health_seen[0][1]
    assert statuses[-1] == 200 and set(statuses[:-1]) == {503}


def test_completion_text_streamed_or_not_equals_llm_generate(
    client: openai.OpenAI, llm: kvflow.LLM, model_dir: tuple[Path, Any]
) -> None:
    tokenizer = model_dir[1]
    whole = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=NO_EOS, **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
            **GREEDY,
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    [expected] = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    assert expected.text == tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert len(expected.token_ids) == 12
    assert whole.choices[0].text == streamed == expected.text
    assert whole.choices[0].finish_reason == "length"
    num_prompt = len(tokenizer.encode(PROMPT))
    for usage in (whole.usage, chunks[-1].usage):
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (num_prompt, 12)
        assert usage.total_tokens == num_prompt + 12


def test_chat_text_streamed_or_not_equals_llm_chat(
    client: openai.OpenAI, llm: kvflow.LLM, model_dir: tuple[Path, Any]
) -> None:
    tokenizer = model_dir[1]
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_body=NO_EOS, **GREEDY
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body=NO_EOS, **GREEDY
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [expected] = llm.chat(MESSAGES, SamplingParams(max_tokens=12, ignore_eos=True))
    assert whole.choices[0].message.content == streamed == expected.text
    assert whole.usage is not None
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_a_seed_gives_the_same_text_every_time_streamed_or_not_and_in_llm(
    client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    """As in vLLM, `seed` decides a sampled output: the same request sent again (a new
    request id), streamed, or through `kvflow.LLM` gives the same text, and the random
    model's byte tokens (split multi-byte characters) stream to the same text."""
    for prompt in (PROMPT, "日本語の", "Café 🚀"):
        seeded: dict[str, Any] = {"temperature": 1.0, "max_tokens": 24, "seed": 7}
        texts = [
            client.completions.create(model=MODEL, prompt=prompt, extra_body=NO_EOS, **seeded)
            .choices[0]
            .text
            for _ in range(2)
        ]
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, stream=True, extra_body=NO_EOS, **seeded
        )
        texts.append("".join(c.choices[0].text for c in chunks))
        params = SamplingParams(temperature=1.0, max_tokens=24, seed=7, ignore_eos=True)
        texts += [out.text for out in llm.generate([prompt, prompt], params)]
        greedy = client.completions.create(model=MODEL, prompt=prompt, extra_body=NO_EOS, **GREEDY)
        assert texts == [texts[0]] * 5, prompt
        assert not texts[0].startswith(greedy.choices[0].text), prompt  # it did sample
        other = client.completions.create(
            model=MODEL, prompt=prompt, extra_body=NO_EOS, **{**seeded, "seed": 8}
        )
        assert other.choices[0].text != texts[0]


def test_content_as_text_parts_reads_as_its_text_in_the_server_and_llm_chat(
    client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    parts: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Café 🚀 "},
                {"type": "text", "text": "schedulers decide"},
            ],
        }
    ]
    served = client.chat.completions.create(
        model=MODEL, messages=parts, extra_body=NO_EOS, **GREEDY
    )
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    [from_parts, from_text] = llm.chat([parts, MESSAGES], params)
    assert served.choices[0].message.content == from_parts.text == from_text.text
    assert from_parts.token_ids == from_text.token_ids
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]: only text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_a_message_s_other_fields_reach_the_chat_template_in_the_server_and_llm_chat(
    client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    # OpenAI's `name` (and tool_call_id, ...) are the template's to render, as in vLLM.
    named: list[Any] = [{**MESSAGES[0], "name": "ada"}]
    served = client.chat.completions.create(
        model=MODEL, messages=named, extra_body=NO_EOS, **GREEDY
    )
    unnamed = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_body=NO_EOS, **GREEDY
    )
    assert served.usage is not None and unnamed.usage is not None
    assert served.usage.prompt_tokens > unnamed.usage.prompt_tokens
    [offline] = llm.chat([named], SamplingParams(max_tokens=12, ignore_eos=True))
    assert served.choices[0].message.content == offline.text


def test_messages_the_chat_template_refuses_are_a_400_naming_messages(
    server: ServerProcess, client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    refused: list[Any] = [*MESSAGES, {"role": "tool", "content": "42"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=refused, max_tokens=2)
    assert caught.value.param == "messages"
    assert "the chat template refused the messages: tool messages are not supported" in str(
        caught.value
    )
    with pytest.raises(ValueError, match="chat template refused the messages: tool messages"):
        llm.chat(refused)
    assert "Traceback" not in server.log()


def test_a_stop_string_cuts_the_output_streamed_or_not(
    client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=NO_EOS, **GREEDY)
    text = full.choices[0].text
    stop = text[4:7]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    expected = text[: text.find(stop)]
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, stop=[stop], extra_body=NO_EOS, **GREEDY
    )
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, stop=stop, stream=True, extra_body=NO_EOS, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    [offline] = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert offline.text == expected
    assert offline.finish_reason is kvflow.FinishReason.STOP


def test_a_shared_prefix_reports_cached_tokens_and_counts_hits(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    prefix = "Caching the key and value tensors of a shared prefix saves prefill work. " * 3
    client.completions.create(model=MODEL, prompt=prefix + "one", max_tokens=2)
    hits = server.metric("kvflow:prefix_cache_hits_total")
    second = client.completions.create(model=MODEL, prompt=prefix + "two", max_tokens=2)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached > 0 and cached % 4 == 0
    assert server.metric("kvflow:prefix_cache_hits_total") == hits + cached


def test_bad_requests_get_their_documented_4xx(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    bad_json = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert "gpt-4" in str(unknown.value)
    with pytest.raises(openai.BadRequestError) as two:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=2)
    assert two.value.param == "n"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt=[5] * 250, max_tokens=10)
    assert "max_model_len is 256" in str(long.value) and "260" in str(long.value)
    with pytest.raises(openai.BadRequestError) as vocab:
        client.completions.create(model=MODEL, prompt=[5, 100000], max_tokens=1)
    assert "100000" in str(vocab.value)


def test_a_client_leaving_mid_stream_frees_its_request(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(2):
            next(line for line in lines if line.startswith("data: {"))
        assert server.metric("kvflow:kv_blocks_used", tier="device") > 0
    server.wait_for_metric("kvflow:num_requests_running", 0)
    server.wait_for_metric("kvflow:kv_blocks_used", 0, tier="device")


def test_concurrent_requests_batch_to_the_same_text_as_alone(
    client: openai.OpenAI, llm: kvflow.LLM
) -> None:
    """Requests that share the server's steps (batched, prefixes shared) get the text
    each gets alone."""
    prompts = [PROMPT, PROMPT + " the lazy dog", "Schedulers decide", "日本語のテキスト"]
    texts: dict[int, str] = {}

    def send(i: int) -> None:
        out = client.completions.create(model=MODEL, prompt=prompts[i], extra_body=NO_EOS, **GREEDY)
        texts[i] = out.choices[0].text

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [texts[i] for i in range(len(prompts))] == [e.text for e in expected]
