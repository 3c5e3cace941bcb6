"""Request bodies for OpenAI-compatible servers, built from a trace's requests.

A trace gives prompts as token ids. Servers that take token ids in `prompt` (vLLM's and
kvflow's `/v1/completions`) get them as they are, folded into `[0, vocab_size)` (id
modulo vocab size; equal ids stay equal, so shared prefixes stay shared). Anywhere else
(chat, or servers that take text only) the prompt is text: each id becomes one word of
`WORDS` (id modulo the list's length), joined by spaces. The words are among the
commonest of English, chosen to be one token each (with their leading space) in common
BPE and SentencePiece vocabularies (GPT-2's, Llama's, Mistral's, Qwen's; not checked
against each here, where no vocabulary files are at hand), so:

- the prompt tokenizes to about the trace's length (plus the server's BOS and, for chat,
  the chat template's tokens);
- requests whose ids share a prefix get texts sharing the same words, which tokenize to
  the same leading tokens: prefix groups stay groups after tokenization.

That is an approximation: a tokenizer may merge two words or add a token at the start,
and the server's `usage.prompt_tokens`, not the trace, is what the report counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from kvflow.request import Request

Api = Literal["completions", "chat"]
PromptFormat = Literal["ids", "text"]

WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "was", "on", "are", "with", "as",
    "be", "at", "by", "this", "have", "from", "or", "had", "not", "but", "what", "all", "were",
    "when", "we", "there", "can", "an", "your", "which", "their", "if", "do", "will", "each",
    "about", "how", "up", "out", "them", "then", "she", "many", "some", "so", "these", "would",
    "other", "into", "has", "more", "her", "two", "like", "him", "see", "time", "could", "no",
    "make", "than", "first", "been", "its", "who", "now", "people", "my", "made", "over", "did",
    "down", "only", "way", "find", "use", "may", "water", "long", "little", "very", "after",
    "words", "called", "just", "where", "most", "know", "get", "through", "back", "much",
    "before", "go", "good", "new", "write", "our", "used", "me", "man", "too", "any", "day",
    "same", "right", "look", "think", "also", "around", "another", "came", "come", "work",
    "three", "word", "must", "because", "does", "part", "even", "place", "well", "such", "here",
    "take", "why", "things", "help", "put", "years", "different", "away", "again", "off",
    "went", "old", "number", "great", "tell", "men", "say", "small", "every", "found", "still",
    "between", "name", "should", "home", "big", "give", "air", "line", "set", "own", "under",
    "read", "last", "never", "us", "left", "end", "along", "while", "might", "next", "sound",
    "below", "saw", "something", "thought", "both", "few", "those", "always", "looked", "show",
    "large", "often", "together", "asked", "house", "world", "going", "want", "school",
    "important", "until", "form", "food", "keep", "children", "feet", "land", "side", "without",
    "boy", "once", "animals", "life", "enough", "took", "sometimes", "four", "head", "above",
    "kind", "began", "almost", "live", "page", "got", "earth", "need", "far", "hand", "high",
    "year", "mother", "light", "parts", "country", "father", "let", "night", "following",
    "picture", "being", "study", "second", "eyes", "soon", "times", "story", "boys", "since",
    "white", "days",
)  # fmt: skip
"""Common English words, meant to be one token each in common tokenizers (see the module
doc)."""


OPTIONAL_FIELDS = ("min_tokens", "ignore_eos")
"""Fields beyond OpenAI's that a server may refuse (an unknown field is a 400 on servers
that validate strictly); the client leaves out those the server names in a 400."""


def prompt_text(token_ids: Sequence[int]) -> str:
    """The text standing for `token_ids`: one word of `WORDS` per id."""
    words = WORDS
    num_words = len(words)
    return " ".join([words[t % num_words] for t in token_ids])


def request_body(
    request: Request,
    *,
    model: str,
    api: Api,
    prompt_format: PromptFormat,
    vocab_size: int,
    omit: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The JSON body that asks the server for `request`: streamed, with usage at the end,
    exactly `request.max_new_tokens` output tokens (`max_tokens`, vLLM's `min_tokens`,
    `ignore_eos`), and kvflow's own fields (`priority`, `tenant`, `ttft_slo_ms`,
    `tpot_slo_ms`) where the request sets them (servers that do not know them ignore
    them, as vLLM does). Fields named in `omit` are left out (of `OPTIONAL_FIELDS`, for a
    server that refuses them).

    Raises:
        ValueError: `prompt_format` "ids" with the chat API, which takes only text.
    """
    if api == "chat" and prompt_format == "ids":
        raise ValueError("the chat API takes text prompts only, not token ids")
    ids = request.prompt_token_ids
    if prompt_format == "ids":
        prompt: Any = [t % vocab_size for t in ids] if max(ids) >= vocab_size else list(ids)
    else:
        prompt = prompt_text(ids)
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    num_tokens = request.max_new_tokens
    body.update(
        max_tokens=num_tokens,
        min_tokens=num_tokens,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    for name in omit:
        body.pop(name, None)
    if request.priority != 0:
        body["priority"] = request.priority
    if request.tenant != "default":
        body["tenant"] = request.tenant
    if request.slo.ttft_ms is not None:
        body["ttft_slo_ms"] = request.slo.ttft_ms
    if request.slo.tpot_ms is not None:
        body["tpot_slo_ms"] = request.slo.tpot_ms
    return body


__all__ = ["OPTIONAL_FIELDS", "WORDS", "Api", "PromptFormat", "prompt_text", "request_body"]
