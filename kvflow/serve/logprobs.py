"""Log-probabilities in OpenAI's shapes: the completions API's four parallel lists
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat's `content` list
of `{token, logprob, bytes, top_logprobs}`. Each token's text is its own decoding (a
token holding part of a multi-byte character decodes to U+FFFD, as in vLLM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from kvflow.engine_adapters.text import TextCodec
from kvflow.request import TokenLogprobs


class LogprobsFormatter:
    """Formats one request's log-probabilities as its outputs arrive.

    Args:
        kind: "completion" or "chat".
        codec: decodes each token on its own.
    """

    def __init__(self, kind: Literal["completion", "chat"], codec: TextCodec) -> None:
        self.kind = kind
        self._codec = codec
        self._offset = 0
        """Characters of token text before the next token (completions' `text_offset`)."""
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprobs] = []

    def add(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> None:
        """Keep an output's tokens for `whole`."""
        self._tokens.extend(token_ids)
        self._logprobs.extend(logprobs)

    def whole(self) -> dict[str, Any]:
        """Every token kept by `add`: the `logprobs` object of a non-streaming choice."""
        return self.chunk(self._tokens, self._logprobs)

    def chunk(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """The `logprobs` object of a choice (or a streamed chunk) holding these tokens."""
        pairs = list(zip(token_ids, logprobs, strict=True))
        if self.kind == "chat":
            return {"content": [self._chat_entry(t, lp) for t, lp in pairs]}
        texts = [self._text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [self._top_dict(t, lp) for t, lp in pairs],
            "text_offset": offsets,
        }

    def _text(self, token_id: int) -> str:
        return self._codec.decode([token_id])

    def _top_dict(self, token_id: int, lp: TokenLogprobs) -> dict[str, float]:
        # With logprobs=0 the sampled token alone, as vLLM answers.
        top = lp.top or ((token_id, lp.logprob),)
        # Tokens that decode alike (parts of one multi-byte character) share a key:
        # the most likely one's value stays, so the dict stays sorted.
        by_text: dict[str, float] = {}
        for t, value in top:
            by_text.setdefault(self._text(t), value)
        return by_text

    def _chat_entry(self, token_id: int, lp: TokenLogprobs) -> dict[str, Any]:
        entry = self._chat_top(token_id, lp.logprob)
        entry["top_logprobs"] = [self._chat_top(t, value) for t, value in lp.top]
        return entry

    def _chat_top(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


__all__ = ["LogprobsFormatter"]
