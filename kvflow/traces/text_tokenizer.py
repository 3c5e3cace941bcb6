"""Text to token ids for conversation traces, with no model download by default.

`HashTokenizer` is kvflow's built-in tokenizer: deterministic in every process, no
vocabulary file. Text splits into words (runs of letters, digits and underscores) and
single punctuation marks; a word yields one token per 6 UTF-8 bytes (rounded up) and a
punctuation mark one token; whitespace yields nothing. Each token id is a hash of its
bytes into [RESERVED_IDS, VOCAB_SIZE). That is about 1.2 tokens per English word,
close to BPE tokenizers' 1.3, and equal text always gives equal tokens, so repeated
system prompts and conversation histories share prefixes exactly.

`load_tokenizer(name)` gives a transformers tokenizer instead, when transformers and
the named tokenizer are installed locally (nothing is downloaded).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

import xxhash

from kvflow.traces.tokens import VOCAB_SIZE

RESERVED_IDS = 256
"""Ids below this are never text: the built-in tokenizer uses a few for role headers."""

ROLE_IDS = {"system": 1, "user": 2, "assistant": 3}
"""The built-in tokenizer's header token of each role; any other role gets 4."""

_PIECES = re.compile(r"\w+|[^\w\s]")
_PIECE_BYTES = 6
_SEED = 0x6B76_7465_7874  # "kvtext"
_MAX_CACHED_PIECES = 1 << 20


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message says why and what to do."""


class TextTokenizer(ABC):
    """Turns text into token ids, and names the tokens that start a chat turn."""

    name: str
    """What `load_tokenizer` was given (``"builtin"`` for `HashTokenizer`)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (no special tokens)."""

    @abstractmethod
    def role_header(self, role: str) -> tuple[int, ...]:
        """Tokens that open a turn of `role` ("system", "user", "assistant", other)."""


class HashTokenizer(TextTokenizer):
    """kvflow's deterministic built-in tokenizer (see the module docstring)."""

    name = "builtin"

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        cache = self._cache
        out: list[int] = []
        for piece in _PIECES.findall(text):
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= _MAX_CACHED_PIECES:
                    cache.clear()
                ids = cache[piece] = _piece_ids(piece)
            out.extend(ids)
        return out

    def role_header(self, role: str) -> tuple[int, ...]:
        return (ROLE_IDS.get(role, 4),)


def _piece_ids(piece: str) -> tuple[int, ...]:
    data = piece.encode("utf-8")
    span = VOCAB_SIZE - RESERVED_IDS
    return tuple(
        RESERVED_IDS + xxhash.xxh32_intdigest(data[i : i + _PIECE_BYTES], seed=_SEED) % span
        for i in range(0, len(data), _PIECE_BYTES)
    )


class HFTokenizer(TextTokenizer):
    """A transformers tokenizer; a turn opens with the tokens of ``"<role>:\\n"``."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        self.name = name
        self._tokenizer = tokenizer
        self._headers: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def role_header(self, role: str) -> tuple[int, ...]:
        header = self._headers.get(role)
        if header is None:
            header = self._headers[role] = tuple(self.encode(f"{role}:\n"))
        return header


def load_tokenizer(name: str | None = None) -> TextTokenizer:
    """The built-in tokenizer (`name` None or "builtin"), or the transformers tokenizer
    `name` (a hub id or a directory) from the local cache; nothing is downloaded.

    Raises:
        TokenizerError: transformers is not installed, or the tokenizer is not available
            locally.
    """
    if name is None or name == "builtin":
        return HashTokenizer()
    try:
        from transformers import AutoTokenizer  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise TokenizerError(
            f"tokenizer {name!r} needs the transformers package, which is not installed "
            "(pip install transformers); leave the tokenizer unset to use kvflow's "
            "built-in tokenizer"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = next(iter(str(err).splitlines()), type(err).__name__)  # one line
        raise TokenizerError(
            f"tokenizer {name!r} is not available locally (kvflow never downloads one; "
            f"fetch it first, e.g. huggingface-cli download {name}): {reason}"
        ) from None
    return HFTokenizer(name, tokenizer)
