"""An OpenAI request body becomes the engine `Request` it asks for: sampling, stopping,
defaults, and kvflow's fields for the policies (priority, tenant, SLOs, deadline)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest
from prometheus_client import CollectorRegistry

from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner
from kvflow.engine_adapters.simulated import LatencyModel
from kvflow.engine_adapters.text import PlaceholderCodec
from kvflow.request import SLO, RequestOutput
from kvflow.serve.errors import APIError
from kvflow.serve.metrics import RequestMetrics
from kvflow.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvflow.serve.responses import ResponseShape
from kvflow.serve.serving import Generation, OpenAIServing, ServedModel
from tests.builders import make_config

NOW = 100.0


class EOSCodec(PlaceholderCodec):
    eos_token_id = 2


def serving(max_model_len: int = 64) -> OpenAIServing:
    config = make_config(**{"scheduler.max_model_len": max_model_len})
    engine = AsyncEngine(config, RealTimeSimRunner(LatencyModel(0, 0, 0, 0)), clock=lambda: NOW)
    model = ServedModel(
        name="m",
        engine_name="sim",
        codec=EOSCodec(),
        engine=engine,
        max_model_len=max_model_len,
        vocab_size=2**32,
        metrics=RequestMetrics("m", CollectorRegistry()),
    )
    return OpenAIServing(model)


def test_sampling_and_kvflow_fields_reach_the_request() -> None:
    api = serving()
    body = CompletionRequest(
        model="m",
        prompt=[5, 6, 7],
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        seed=42,
        stop_token_ids=[11],
        priority=-3,
        tenant="team-b",
        ttft_slo_ms=250,
        tpot_slo_ms=40,
        deadline_s=1.5,
    )
    [ids] = api.completion_prompts(body)
    req = api.make_request(body, ids, body.max_tokens, "cmpl")
    assert req.prompt_token_ids == (5, 6, 7) and req.max_new_tokens == 9
    assert (req.priority, req.tenant) == (-3, "team-b")
    assert req.slo == SLO(ttft_ms=250, tpot_ms=40)
    assert req.deadline == NOW + 1.5  # seconds after arrival, on the engine's clock
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.7, 0.9, 0, 42)
    assert s.stop_token_ids == (11, 2)  # the model's EOS joins the stop tokens


def test_ignore_eos_leaves_the_eos_out_and_defaults_follow_openai() -> None:
    api = serving()
    body = CompletionRequest(model="m", prompt="a b c", ignore_eos=True)
    [ids] = api.completion_prompts(body)
    req = api.make_request(body, ids, body.max_tokens, "cmpl")
    assert req.sampling.stop_token_ids == ()
    assert req.max_new_tokens == 16  # completions' default
    assert req.sampling.temperature == 1.0
    assert req.deadline is None and req.slo == SLO()
    chat = ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content="hi")])
    ids = api.chat_prompt(chat)
    req = api.make_request(chat, ids, chat.max_completion_tokens or chat.max_tokens, "chat")
    assert req.max_new_tokens == 64 - len(ids)  # chat's default: the rest of the context


def test_prompt_checks_name_the_field() -> None:
    api = serving()
    for body, param in [
        (CompletionRequest(model="m", prompt=[1, 2**32]), "prompt"),
        (CompletionRequest(model="m", prompt=""), "prompt"),
        (CompletionRequest(model="m", prompt=["a", "b"], stream=True), "prompt"),
        (CompletionRequest(model="m", prompt=["a", ""]), "prompt[1]"),
        (CompletionRequest(model="m", prompt="x", echo=True), "echo"),
    ]:
        with pytest.raises(APIError) as caught:
            api.completion_prompts(body)
        assert (caught.value.status, caught.value.param) == (400, param)
    long_body = CompletionRequest(model="m", prompt=[1] * 60, max_tokens=5)
    with pytest.raises(APIError) as caught:
        api.make_request(long_body, [1] * 60, 5, "cmpl")
    assert "max_model_len is 64" in caught.value.message and "65" in caught.value.message


def test_a_stop_string_ends_usage_and_stream_at_the_token_completing_it() -> None:
    """A reader that falls behind gets the steps it missed in one output (coalesced):
    a stop string inside it ends the count at the token whose text completes it, as
    when the steps came one by one (vLLM's count), whole or streamed."""
    api = serving()
    body = CompletionRequest(model="m", prompt="a b", stop="tok9 tok1")
    request = api.make_request(body, api.completion_prompts(body)[0], 16, "cmpl")

    def generation() -> Generation:
        async def later() -> AsyncIterator[RequestOutput]:
            yield RequestOutput(request.request_id, (9, 15, 4, 5), 5, False)

        first = RequestOutput(request.request_id, (7,), 1, False)
        observer = api.model.metrics.observer(2)
        return Generation(request, first, later(), observer, set())

    async def both() -> tuple[tuple[str, str, int], list[bytes]]:
        whole = await api.collect(generation(), ["tok9 tok1"])
        shape = ResponseShape("completion", request.request_id, "m", with_usage=True)
        events = [e async for e in api.stream(generation(), ["tok9 tok1"], shape)]
        return whole, events

    whole, events = anyio.run(both)
    assert whole == ("tok7 ", "stop", 3)  # tok7, tok9, tok15: not tok4 and tok5
    chunks = [
        json.loads(line[6:])
        for e in events
        for line in e.decode().split("\n\n")
        if line.startswith("data: {")
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "tok7 "
    assert chunks[-1]["usage"]["completion_tokens"] == 3
