"""Request bodies for OpenAI-compatible servers, built from trace requests."""

from __future__ import annotations

import pytest

from kvflow.request import SLO, Request
from kvflow.traces.endpoint_prompts import WORDS, prompt_text, request_body


def body_of(request: Request, **overrides: object) -> dict[str, object]:
    options: dict[str, object] = {
        "model": "m", "api": "completions", "prompt_format": "ids", "vocab_size": 1000,
    }  # fmt: skip
    options.update(overrides)
    return request_body(request, **options)  # type: ignore[arg-type]


def test_a_completions_body_streams_exactly_the_traces_output_length() -> None:
    body = body_of(Request("a", (5, 1003, 999), 7))
    assert body == {
        "model": "m",
        "prompt": [5, 3, 999],  # folded into the vocabulary: equal ids stay equal
        "max_tokens": 7,
        "min_tokens": 7,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_kvflow_fields_ride_along_only_where_the_request_sets_them() -> None:
    request = Request("a", (1, 2), 3, priority=2, tenant="t1", slo=SLO(ttft_ms=500.0))
    body = body_of(request, omit=frozenset({"min_tokens"}))
    assert body["priority"] == 2 and body["tenant"] == "t1" and body["ttft_slo_ms"] == 500.0
    assert "tpot_slo_ms" not in body and "min_tokens" not in body


def test_chat_takes_text_built_from_one_common_word_per_token() -> None:
    ids = (0, 1, 2, len(WORDS) + 1)
    body = body_of(Request("a", ids, 2), api="chat", prompt_format="text")
    assert body["messages"] == [{"role": "user", "content": "the of and of"}]
    assert "prompt" not in body
    with pytest.raises(ValueError, match="chat API takes text prompts only"):
        body_of(Request("a", ids, 2), api="chat", prompt_format="ids")


def test_shared_token_prefixes_give_shared_word_prefixes() -> None:
    prefix = tuple(range(100, 164))
    first = prompt_text((*prefix, 7, 8, 9))
    second = prompt_text((*prefix, 10, 11))
    shared = " ".join(first.split()[:64])
    assert first.startswith(shared + " ") and second.startswith(shared + " ")
    assert len(first.split()) == 67 and len(second.split()) == 66
    assert len(set(WORDS)) == len(WORDS) and all(w.isalpha() and w.islower() for w in WORDS)
