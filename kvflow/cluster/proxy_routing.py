"""What the router process (`kvflow router`) routes with: a router of the
`kvflow.routers` registry (`kvflow.cluster.routers.create`, the same code that routes a
simulated fleet), and each HTTP request as the engine `Request` an instance would make
of it (`routing_request`), so a router reads the same prompt tokens and block keys in
both clocks.
"""

from __future__ import annotations

import itertools
from typing import Any

from kvflow.engine_adapters.text import TextCodec
from kvflow.request import Request

DEFAULT_MAX_TOKENS = 16
_ids = itertools.count()


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def prompt_ids(path: str, body: dict[str, Any], codec: TextCodec) -> list[int]:
    """The prompt's token ids as an instance with `codec` would make them (chat
    messages through its chat template; a batch of prompts by its first); [] when the
    body has no prompt the router can read (the instance answers that itself). A list
    of ids comes back as it is, unchecked (`routing_request` checks it)."""
    try:
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list):
                return []
            turns = [
                {"role": str(m.get("role")), "content": _message_text(m.get("content"))}
                for m in messages
                if isinstance(m, dict)
            ]
            return codec.encode_chat(turns, bool(body.get("add_generation_prompt", True)))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return codec.encode(prompt)
        if isinstance(prompt, list):
            return prompt  # token ids: `Request` checks them at C speed
    except (ValueError, TypeError, KeyError):
        pass
    return []


def routing_request(path: str, body: dict[str, Any], codec: TextCodec) -> Request:
    """The request a router sees: the prompt's ids and the output length asked for.
    A body without a readable prompt routes as a one-token prompt (no block: by load)."""
    ids = prompt_ids(path, body, codec)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS
    rid = f"route-{next(_ids)}"
    try:
        return Request(rid, ids, max_tokens)
    except ValueError:  # empty, or ids outside uint32: the instance rejects it
        return Request(rid, (0,), max_tokens)


__all__ = ["DEFAULT_MAX_TOKENS", "prompt_ids", "routing_request"]
