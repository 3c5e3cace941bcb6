"""ShareGPT-style conversations: multi-turn sessions whose turns share their history.

The file is a JSON array, or JSON lines, of conversations::

    {"id": "abc", "conversations": [{"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello! How can I help?"}]}

(``"messages"`` with ``{"role": ..., "content": ...}`` turns is read the same way). Roles
``human``/``user`` are the user, ``gpt``/``assistant``/``chatgpt``/``bard``/``bing``/
``model`` the assistant, ``system`` the system; other roles are kept as context.

Every assistant turn after the first turn is one request. Its prompt is the whole
conversation before it, each turn as a role header and its text's tokens, then the
assistant's header; its output length is the assistant turn's token count (at least 1).
So the prompt of a conversation's request k is an exact prefix of request k + 1's.
Tokens come from kvflow's built-in deterministic tokenizer, or from a transformers
tokenizer installed locally (`TraceOptions.tokenizer`).

Arrivals: conversations start as a Poisson process at `TraceOptions.session_rate_rps`
(seeded by `TraceOptions.seed`), in file order; a conversation's requests follow each
other `TraceOptions.think_time_s` apart. These times are fixed at load (open loop).
Arrivals start at 0. Request ids are ``{conversation id}-{k}``, the conversation id
being its ``id`` or ``c{i}`` (i its 0-based index in the file).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvflow.request import Request
from kvflow.traces.errors import FieldError, TraceFormatError
from kvflow.traces.formats._io import iter_json_lines, open_binary, show
from kvflow.traces.formats.base import LoadLog, TraceFormat, TraceHead, TraceOptions, rebase
from kvflow.traces.limits import check_length, check_total
from kvflow.traces.synthetic import poisson_arrivals
from kvflow.traces.text_tokenizer import TextTokenizer, load_tokenizer

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
"""Speaker names as they appear in conversation files, to the roles kvflow knows."""

_SPACE = re.compile(r"\s*")

Turns = list[tuple[str, str]]


def _turns_key(obj: dict[str, Any]) -> str:
    return "conversations" if "conversations" in obj else "messages"


def _turns(obj: object) -> tuple[str | None, Turns]:
    """(conversation id or None, [(role, text), ...]) of one conversation object."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {show(obj)}")
    key = _turns_key(obj)
    turns = obj.get(key)
    if not isinstance(turns, list):
        problem = "missing" if turns is None else f"expected a list of turns, got {show(turns)}"
        raise FieldError("conversations", problem)
    conv_id = obj.get("id")
    if conv_id is not None and (
        isinstance(conv_id, bool) or not isinstance(conv_id, str | int) or conv_id == ""
    ):
        raise FieldError("id", f"expected a non-empty string or an integer, got {show(conv_id)}")
    out: Turns = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise FieldError(f"{key}[{i}]", f"expected a JSON object, got {show(turn)}")
        # ShareGPT's keys or OpenAI's, named as the turn (else its list) spells them.
        sharegpt = key == "conversations"
        speaker_key = _key_of(turn, "from", "role", sharegpt)
        text_key = _key_of(turn, "value", "content", sharegpt)
        speaker, text = turn.get(speaker_key), turn.get(text_key)
        if not isinstance(speaker, str) or not speaker:
            raise FieldError(
                f"{key}[{i}].{speaker_key}", f"expected a speaker name, got {show(speaker)}"
            )
        if not isinstance(text, str):
            raise FieldError(f"{key}[{i}].{text_key}", f"expected a string, got {show(text)}")
        out.append((ROLES.get(speaker.lower(), speaker.lower()), text))
    return (None if conv_id is None else str(conv_id)), out


def _key_of(turn: dict[str, Any], sharegpt_key: str, openai_key: str, sharegpt: bool) -> str:
    """The key a turn uses for one of its two fields: the one present, else the one its
    list's style uses."""
    if sharegpt_key in turn:
        return sharegpt_key
    if openai_key in turn:
        return openai_key
    return sharegpt_key if sharegpt else openai_key


@dataclass(frozen=True, slots=True)
class EncodedSession:
    """A conversation's tokens, before its requests' prompts are built.

    Attributes:
        context: every turn's role header and tokens, in order.
        cuts: for each request, (index of its assistant turn, prompt tokens before the
            assistant header, output length): its prompt is ``context[:n] + header``.
    """

    context: list[int]
    cuts: list[tuple[int, int, int]]


def encode_session(turns: Turns, tokenizer: TextTokenizer) -> EncodedSession:
    """Tokenize one conversation (linear in its text; no prompt built yet)."""
    context: list[int] = []
    cuts = []
    for i, (role, text) in enumerate(turns):
        tokens = tokenizer.encode(text)
        if role == "assistant" and i > 0:
            cuts.append((i, len(context), max(1, len(tokens))))
        context.extend(tokenizer.role_header(role))
        context.extend(tokens)
    return EncodedSession(context, cuts)


def session_prompts(turns: Turns, tokenizer: TextTokenizer) -> list[tuple[tuple[int, ...], int]]:
    """(prompt tokens, output length) of each request of one conversation."""
    return _build_prompts(encode_session(turns, tokenizer), tokenizer.role_header("assistant"))


def _build_prompts(
    session: EncodedSession, answer: tuple[int, ...]
) -> list[tuple[tuple[int, ...], int]]:
    context = session.context
    return [(tuple(context[:n]) + answer, num_out) for _, n, num_out in session.cuts]


def _check_lengths(session: EncodedSession, key: str, num_answer_tokens: int) -> None:
    """Each request's prompt and output within `MAX_TRACE_TOKENS` (prompts grow with
    the conversation: a long one is refused before its prompts are built)."""
    for i, n, num_out in session.cuts:
        check_length(
            f"{key}[{i}]", n + num_answer_tokens, f"a prompt of {n + num_answer_tokens} tokens"
        )
        check_length(f"{key}[{i}].value", num_out, f"a reply of {num_out} tokens")


def _iter_array(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, element) of each element of a file holding one JSON array."""
    try:
        with open_binary(path) as file:
            text = file.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TraceFormatError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as err:
        raise TraceFormatError(f"{path}: cannot read trace file: {err}") from None
    decoder = json.JSONDecoder()
    idx = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
    if text[idx : idx + 1] != "[":
        raise TraceFormatError(f"{path}:1: expected a JSON array of conversations")
    line, counted = 1, 0
    idx = _SPACE.match(text, idx + 1).end()  # type: ignore[union-attr]
    if text[idx : idx + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            value, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as err:
            raise TraceFormatError(
                f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
            ) from None
        except RecursionError:  # Python's parser recurses once per level
            raise TraceFormatError(f"{path}:{line}: invalid JSON: nested too deeply") from None
        yield line, value
        idx = _SPACE.match(text, idx).end()  # type: ignore[union-attr]
        sep = text[idx : idx + 1]
        if sep == "]":
            return
        if sep != ",":
            lineno = line + text.count("\n", counted, idx)
            raise TraceFormatError(f"{path}:{lineno}: invalid JSON: expected ',' or ']'")
        idx = _SPACE.match(text, idx + 1).end()  # type: ignore[union-attr]


class ShareGPTFormat(TraceFormat):
    """ShareGPT-style conversations; each assistant turn is a request."""

    name = "sharegpt"
    summary = "ShareGPT-style conversations, a JSON array or JSON lines (multi-turn)"

    def sniff(self, head: TraceHead) -> bool:
        first = head.first_json
        if isinstance(first, dict):
            return "conversations" in first or "messages" in first
        start = head.text.lstrip()[:1]
        return start == "[" and bool(re.search(r'"(conversations|messages)"\s*:', head.text))

    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        head = TraceHead.read(path)
        is_array = not isinstance(head.first_json, dict) and head.text.lstrip()[:1] == "["
        items = _iter_array(path) if is_array else iter_json_lines(path, log)
        tokenizer = load_tokenizer(options.tokenizer)
        answer = tokenizer.role_header("assistant")
        encoded: list[tuple[str, EncodedSession]] = []
        line_of_id: dict[str, int] = {}
        for index, (line_no, obj) in enumerate(items):
            try:
                conv_id, turns = _turns(obj)
                conv_id = conv_id if conv_id is not None else f"c{index}"
                if conv_id in line_of_id:
                    raise FieldError(
                        "id",
                        f"duplicate conversation id {conv_id!r} (first on line "
                        f"{line_of_id[conv_id]})",
                    )
                session = encode_session(turns, tokenizer)
                _check_lengths(session, _turns_key(obj), len(answer))
            except ValueError as err:
                log.bad(line_no, err)
                continue
            line_of_id[conv_id] = line_no
            if session.cuts:
                encoded.append((conv_id, session))
            else:
                log.drop("conversations without an assistant reply")
        check_total(path, [n + len(answer) for _, session in encoded for _, n, _ in session.cuts])
        sessions = [(conv_id, _build_prompts(session, answer)) for conv_id, session in encoded]
        rate, seed = options.session_rate_rps, options.seed
        starts = rebase(poisson_arrivals(len(sessions), rate, seed=seed))
        think = options.think_time_s
        return [
            Request(
                request_id=f"{conv_id}-{k}",
                prompt_token_ids=prompt,
                max_new_tokens=num_out,
                arrival_time=start + k * think,
            )
            for (conv_id, prompts), start in zip(sessions, starts, strict=True)
            for k, (prompt, num_out) in enumerate(prompts)
        ]
