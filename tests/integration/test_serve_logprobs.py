"""`logprobs` / `top_logprobs` through `kvflow serve --engine torch` (a tiny random
Llama in float64) and the official `openai` client: each greedy token's log-probability
equals log-softmax of transformers' logits at its position, the top log-probabilities
are sorted with the greedy token first, and streamed chunks carry the same values as the
whole response."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch

from tests.integration.test_serve_model import MESSAGES, MODEL, PROMPT, client, model_dir, server

__all__ = ["client", "model_dir", "server"]  # the fixtures this module shares

NUM_TOKENS = 8
TOP = 3
REQUEST: dict[str, Any] = {"temperature": 0.0, "max_tokens": NUM_TOKENS}
NO_EOS = {"ignore_eos": True}
TOLERANCE = 1e-9


def reference(model_path: Path, prompt_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of `prompt_ids` (NUM_TOKENS tokens) and the
    log-softmax of its float64 logits at each output position, [NUM_TOKENS, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float64)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(NUM_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        logits = model(torch.tensor([ids[:-1]])).logits[0, len(prompt_ids) - 1 :]
    return ids[len(prompt_ids) :], torch.log_softmax(logits.to(torch.float64), -1)


def check_top(top: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    """`top` equals `expected` (texts, and values within the tolerance), sorted."""
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    assert [t for t, _ in top] == [t for t, _ in expected]
    assert all(abs(v - e) <= TOLERANCE for v, (_, e) in zip(values, expected, strict=True))


def top_of(logprobs: torch.Tensor, tokenizer: Any) -> list[tuple[int, str, float]]:
    """The TOP most likely `(token id, text, logprob)` of one position's log-softmax."""
    values, ids = torch.topk(logprobs, TOP)
    pairs = zip(ids.tolist(), values.tolist(), strict=True)
    return [(t, tokenizer.decode([t]), v) for t, v in pairs]


def test_completion_logprobs_equal_transformers_streamed_or_not(
    client: openai.OpenAI, model_dir: tuple[Path, Any]
) -> None:
    path, tokenizer = model_dir
    prompt_ids = tokenizer.encode(PROMPT)
    greedy, logprobs = reference(path, prompt_ids)
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, logprobs=TOP, extra_body=NO_EOS, **REQUEST
    )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert lp.tokens == [tokenizer.decode([t]) for t in greedy]
    for i, token in enumerate(greedy):
        expected = float(logprobs[i, token])
        assert abs(lp.token_logprobs[i] - expected) <= TOLERANCE, (i, lp.token_logprobs[i])
        top = top_of(logprobs[i], tokenizer)
        assert top[0][0] == token  # the greedy token is the most likely
        # OpenAI's shape is a dict by text: tokens that decode alike (parts of one
        # multi-byte character) share one key, the most likely one's value.
        by_text: dict[str, float] = {}
        for _, text, value in top:
            by_text.setdefault(text, value)
        check_top(list(lp.top_logprobs[i].items()), list(by_text.items()))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(NUM_TOKENS)]

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, logprobs=TOP, stream=True, extra_body=NO_EOS, **REQUEST
        )
    )
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        part = chunk.choices[0].logprobs
        if part is not None:
            for key, values in streamed.items():
                values.extend(getattr(part, key))
    assert streamed == {
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "text_offset": lp.text_offset,
    }


def test_chat_logprobs_equal_transformers_streamed_or_not(
    client: openai.OpenAI, model_dir: tuple[Path, Any]
) -> None:
    path, tokenizer = model_dir
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    greedy, logprobs = reference(path, tokenizer.encode(rendered, add_special_tokens=False))
    whole = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        logprobs=True,
        top_logprobs=TOP,
        extra_body=NO_EOS,
        **REQUEST,
    )
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content
    assert content is not None and len(content) == NUM_TOKENS
    for i, (entry, token) in enumerate(zip(content, greedy, strict=True)):
        expected = float(logprobs[i, token])
        assert entry.token == tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - expected) <= TOLERANCE, (i, entry.logprob)
        top = top_of(logprobs[i], tokenizer)
        assert top[0][0] == token  # the greedy token is the most likely
        check_top([(t.token, t.logprob) for t in entry.top_logprobs], [(t, v) for _, t, v in top])
        assert [t.bytes for t in entry.top_logprobs] == [list(t.encode()) for _, t, _ in top]

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            logprobs=True,
            top_logprobs=TOP,
            stream=True,
            extra_body=NO_EOS,
            **REQUEST,
        )
    )
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_logprobs_zero_returns_the_sampled_token_only(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, logprobs=0, extra_body=NO_EOS, **REQUEST
    )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert lp.token_logprobs is not None
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {token: value}
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, extra_body=NO_EOS, **REQUEST
    )
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == NUM_TOKENS
    assert all(entry.top_logprobs == [] for entry in content)


def test_requests_without_logprobs_get_none(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=NO_EOS, **REQUEST)
    assert whole.choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=2, **REQUEST)
    assert "top_logprobs=2 needs logprobs=true" in str(caught.value)
