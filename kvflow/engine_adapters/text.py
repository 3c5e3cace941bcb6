"""Text in and out: a codec per model, incremental detokenization, stop strings (for
`kvflow.LLM` and `kvflow serve` alike).

`HFTextCodec` wraps the model directory's transformers tokenizer and chat template;
`PlaceholderCodec` serves `--engine sim`, which has no tokenizer: a word is one token,
a token reads back as ``"tok123 "``.

Streaming decodes as vLLM's detokenizer and transformers' `TextStreamer` do: the new
text of a step is the decoding of a short window of recent tokens minus the decoding of
the window without the new ones, emitted only once it no longer ends in U+FFFD (the
replacement character a partial multi-byte character decodes to).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import xxhash

from kvflow.engine_adapters.realtime_sim import SIM_FIRST_TOKEN_ID, SIM_VOCAB_SIZE
from kvflow.request import FinishReason, RequestOutput

Message = dict[str, str]
"""A chat message: {"role": ..., "content": ...}."""

_REPLACEMENT = "\ufffd"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
"""Files transformers loads a tokenizer from; a directory with none of them has none."""


class Detokenizer(abc.ABC):
    """Turns a request's output tokens into text, step by step."""

    @abc.abstractmethod
    def push(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens complete (possibly empty: held back)."""

    @abc.abstractmethod
    def flush(self) -> str:
        """Whatever is still held back, at the end of the output."""


class WindowDetokenizer(Detokenizer):
    """The prefix-offset method (vLLM's `detokenize_incrementally`), over any decode."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._token_ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids = self._token_ids
        if self._read_offset == len(ids):
            return ""
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return new_text[len(prefix_text) :]


class _PlaceholderDetokenizer(Detokenizer):
    def push(self, token_ids: Sequence[int]) -> str:
        return "".join([f"tok{t} " for t in token_ids])

    def flush(self) -> str:
        return ""


class TextCodec(abc.ABC):
    """A served model's text side: prompts to token ids, token ids to text."""

    eos_token_id: int | None
    """The end-of-sequence token (None: the model has none; output ends by length)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """A completion prompt's token ids (with the model's BOS, as vLLM adds it)."""

    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """The token ids of `messages` rendered by the chat template."""

    @abc.abstractmethod
    def detokenizer(self) -> Detokenizer:
        """A fresh incremental detokenizer for one output."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of whole `token_ids` (special tokens left out)."""


class PlaceholderCodec(TextCodec):
    """For the simulated engine: a whitespace-separated word is one token (``tokN``
    reads back as id N; any other word hashes into the vocabulary), token N decodes to
    ``"tokN "``; a chat message is its role word then its content's words."""

    eos_token_id: int | None = None
    _TOKEN = re.compile(r"tok(\d+)")

    def encode(self, text: str) -> list[int]:
        return [self._word_id(w) for w in text.split()]

    def _word_id(self, word: str) -> int:
        m = self._TOKEN.fullmatch(word)
        if m is not None and int(m.group(1)) < SIM_VOCAB_SIZE:
            return int(m.group(1))
        span = SIM_VOCAB_SIZE - SIM_FIRST_TOKEN_ID
        return SIM_FIRST_TOKEN_ID + xxhash.xxh64_intdigest(word.encode()) % span

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        words = [w for m in messages for w in (f"{m['role']}:", *m["content"].split())]
        if add_generation_prompt:
            words.append("assistant:")
        return [self._word_id(w) for w in words]

    def detokenizer(self) -> Detokenizer:
        return _PlaceholderDetokenizer()

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f"tok{t} " for t in token_ids)


class HFTextCodec(TextCodec):
    """A transformers tokenizer (`AutoTokenizer.from_pretrained(model_dir)`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_id = None if eos is None else int(eos)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> HFTextCodec:
        """The tokenizer saved with the checkpoint.

        Raises:
            ValueError: the directory has no tokenizer transformers can load (one line).
        """
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as err:
            why = " ".join(str(err).split())  # transformers' messages span lines
            raise ValueError(f"{str(model_dir)!r}: no loadable tokenizer: {why}") from None
        return cls(tokenizer)

    @staticmethod
    def saved_in(model_dir: str | Path) -> bool:
        """Whether `model_dir` holds a tokenizer's files (else it has none to load)."""
        return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """The token ids of `messages` rendered by the tokenizer's chat template.

        Raises:
            ValueError: no chat template, or the template refused the messages (many
                raise on roles or orders they do not take: Llama 2's, Mistral's, ...).
        """
        if not self.has_chat_template:
            raise ValueError("the model's tokenizer has no chat template; use /v1/completions")
        from jinja2 import TemplateError

        # Rendered to text first, then encoded without special tokens: the template
        # writes the BOS itself (as vLLM does).
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as err:
            raise ValueError(f"the chat template refused the messages: {err}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenizer(self) -> Detokenizer:
        return WindowDetokenizer(self.decode)

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text


class StopStrings:
    """Cuts an output before its first stop string, holding back text that could be
    the start of one, so a streamed output never shows more than the final one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (then the text is
        everything before it and the output is over)."""
        if not self.stops:
            return text, False
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = self._longest_partial(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that a stop string starts with."""
        longest = min(len(text), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class OutputText:
    """A request's outputs as text deltas: detokenized incrementally, cut at stop strings."""

    def __init__(self, codec: TextCodec, stops: Sequence[str]) -> None:
        self._detokenizer = codec.detokenizer()
        self._stops = StopStrings(stops)
        self.num_kept = 0
        """How many of the last output's new tokens the output keeps: all of them, but
        when a stop string ended it, those up to the one whose text completed it (the
        tokens usage counts and logprobs list, as vLLM stops at that token)."""

    def feed(self, out: RequestOutput) -> tuple[str, str | None]:
        """The new text, and the finish reason once the output is over ("stop" when a
        stop string ended it: then leave the stream, which aborts the request)."""
        new = out.new_token_ids
        # Several tokens with stop strings (steps a slow reader missed, coalesced): one
        # at a time, so the output ends at the token that completes a stop string.
        split = len(new) > 1 and bool(self._stops.stops)
        pieces = [new[i : i + 1] for i in range(len(new))] if split else [new]
        parts: list[str] = []
        for i, piece in enumerate(pieces):
            text = self._detokenizer.push(piece)
            if out.finished and i == len(pieces) - 1:
                text += self._detokenizer.flush()
            text, stopped = self._stops.feed(text)
            parts.append(text)
            if stopped:
                self.num_kept = i + 1 if split else len(new)
                return "".join(parts), "stop"
        self.num_kept = len(new)
        if out.finished:
            return "".join(parts) + self._stops.flush(), finish_reason_name(out.finish_reason)
        return "".join(parts), None


def finish_reason_name(reason: FinishReason | None) -> str:
    """OpenAI's (and vLLM's) word for a kvflow finish reason."""
    if reason is None:
        return "unknown"
    return "abort" if reason is FinishReason.ABORTED else str(reason)


__all__ = [
    "TOKENIZER_FILES",
    "Detokenizer",
    "HFTextCodec",
    "Message",
    "OutputText",
    "PlaceholderCodec",
    "StopStrings",
    "TextCodec",
    "WindowDetokenizer",
    "finish_reason_name",
]
