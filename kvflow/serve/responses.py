"""The response objects of the completions and chat completions endpoints, whole and as
server-sent events. A stream's chunks differ only in their text and finish reason, so
the constant part of a chunk is serialised once per request, not once per token."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Compact JSON (one encoder: `json.dumps` with options builds one per call)."""


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached: int) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


class ResponseShape:
    """What one request's responses look like.

    Args:
        kind: "completion" (`/v1/completions`) or "chat" (`/v1/chat/completions`).
        request_id: the response id.
        model: the served model name.
        with_usage: streamed chunks carry `"usage": null` and a last chunk the usage
            (`stream_options.include_usage`).
    """

    def __init__(
        self, kind: Literal["completion", "chat"], request_id: str, model: str, with_usage: bool
    ) -> None:
        self.kind = kind
        self.with_usage = with_usage
        self._head = {
            "id": request_id,
            "object": "text_completion" if kind == "completion" else "chat.completion",
            "created": int(time.time()),
            "model": model,
        }
        chunk_head = dict(self._head)
        if kind == "chat":
            chunk_head["object"] = "chat.completion.chunk"
        self._chunk_head = chunk_head
        self._prefix = "data: " + _dumps(chunk_head)[:-1] + ',"choices":[{"index":0,'
        self._suffix = ',"usage":null}\n\n' if with_usage else "}\n\n"

    def whole(
        self, choices: Sequence[tuple[str, str, dict[str, Any] | None]], usage: dict[str, Any]
    ) -> dict[str, Any]:
        """The non-streaming response: one choice per `(text, finish reason, logprobs)`
        (a batch of prompts gives several), and the usage of them all."""
        out: list[dict[str, Any]] = []
        for index, (text, finish_reason, logprobs) in enumerate(choices):
            choice: dict[str, Any] = {"index": index}
            if self.kind == "completion":
                choice["text"] = text
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            out.append(choice)
        return {**self._head, "choices": out, "usage": usage}

    def first_event(self) -> bytes | None:
        """The chunk before any text: chat announces the assistant's role."""
        if self.kind == "completion":
            return None
        return self._event('"delta":{"role":"assistant","content":""}', None)

    def event(
        self, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
    ) -> bytes:
        """A chunk with new text (possibly empty), its tokens' `logprobs` object when the
        request asked, and, at the end, the finish reason."""
        if self.kind == "completion":
            body = '"text":' + _dumps(text)
        else:
            body = '"delta":{"content":' + _dumps(text) + "}" if text else '"delta":{}'
        return self._event(body, finish_reason, "null" if logprobs is None else _dumps(logprobs))

    def usage_event(self, usage: dict[str, Any]) -> bytes:
        """The last chunk of `include_usage`: no choices, the usage."""
        return f"data: {_dumps({**self._chunk_head, 'choices': [], 'usage': usage})}\n\n".encode()

    def _event(self, body: str, finish_reason: str | None, logprobs: str = "null") -> bytes:
        reason = "null" if finish_reason is None else _dumps(finish_reason)
        return (
            f'{self._prefix}{body},"logprobs":{logprobs},"finish_reason":{reason}}}]{self._suffix}'
        ).encode()


DONE = b"data: [DONE]\n\n"

__all__ = ["DONE", "ResponseShape", "usage"]
