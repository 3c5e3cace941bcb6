"""ShareGPT-style conversations and the text tokenizers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvflow.traces import TraceFormatError, detect_format, load_trace, read_trace
from kvflow.traces.formats.sharegpt import session_prompts
from kvflow.traces.synthetic import poisson_arrivals
from kvflow.traces.text_tokenizer import (
    RESERVED_IDS,
    ROLE_IDS,
    HashTokenizer,
    TokenizerError,
    load_tokenizer,
)
from kvflow.traces.tokens import VOCAB_SIZE

USER, ASSISTANT, SYSTEM = (ROLE_IDS[r] for r in ("user", "assistant", "system"))

CONVERSATIONS = [
    {
        "id": "alpha",
        "conversations": [
            {"from": "human", "value": "Hello there, how are you?"},  # 7 tokens
            {"from": "gpt", "value": "I am fine."},  # 4
            {"from": "human", "value": "Tell me a joke"},  # 4
            {"from": "gpt", "value": "Why did the chicken cross the road?"},  # 9 (chicken: 2)
        ],
    },
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},  # 3
            {"from": "human", "value": "Hi"},  # 1
            {"from": "gpt", "value": ""},  # 0: counts as 1 output token
        ]
    },
    {"id": "lonely", "conversations": [{"from": "human", "value": "anyone?"}]},
    {
        "id": 7,
        "messages": [
            {"role": "user", "content": "internationalization"},  # 20 bytes: 4 tokens
            {"role": "assistant", "content": "ok"},
        ],
    },
]


def write_array(tmp_path: Path, items: Sequence[object], name: str = "share.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(items, indent=2))
    return path


def write_lines(tmp_path: Path, items: Sequence[object], name: str = "share.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_each_reply_is_a_request_whose_prompt_is_the_history(tmp_path: Path) -> None:
    path = write_array(tmp_path, CONVERSATIONS)
    assert detect_format(path) == "sharegpt"
    loaded = read_trace(path)
    by_id = {r.request_id: r for r in loaded.requests}
    assert sorted(by_id) == ["7-0", "alpha-0", "alpha-1", "c1-0"]
    a0, a1 = by_id["alpha-0"], by_id["alpha-1"]
    # alpha-0: user header + 7 tokens, then the assistant header.
    assert len(a0.prompt_token_ids) == 1 + 7 + 1 and a0.max_new_tokens == 4
    assert a0.prompt_token_ids[0] == USER and a0.prompt_token_ids[-1] == ASSISTANT
    # alpha-1: alpha-0's prompt, the reply (4), user header + 4, assistant header.
    assert len(a1.prompt_token_ids) == 9 + 4 + 1 + 4 + 1 and a1.max_new_tokens == 9
    assert a1.prompt_token_ids[:9] == a0.prompt_token_ids
    c1 = by_id["c1-0"]
    assert c1.prompt_token_ids[0] == SYSTEM and len(c1.prompt_token_ids) == 1 + 3 + 1 + 1 + 1
    assert c1.max_new_tokens == 1
    assert len(by_id["7-0"].prompt_token_ids) == 1 + 4 + 1
    assert loaded.dropped == {"conversations without an assistant reply": 1}
    for r in loaded.requests:
        text = [t for t in r.prompt_token_ids if t >= RESERVED_IDS]
        assert all(t < VOCAB_SIZE for t in text)


def test_arrivals_are_poisson_sessions_with_think_time(tmp_path: Path) -> None:
    path = write_array(tmp_path, CONVERSATIONS)
    requests = load_trace(path, session_rate_rps=2.0, think_time_s=4.0, seed=3)
    starts = poisson_arrivals(3, 2.0, seed=3)
    starts = [t - starts[0] for t in starts]
    expected = {"alpha-0": starts[0], "alpha-1": starts[0] + 4.0}
    expected |= {"c1-0": starts[1], "7-0": starts[2]}
    assert {r.request_id: r.arrival_time for r in requests} == expected
    assert [r.arrival_time for r in requests] == sorted(expected.values())


def test_json_lines_read_the_same_as_an_array(tmp_path: Path) -> None:
    array = load_trace(write_array(tmp_path, CONVERSATIONS))
    lines = write_lines(tmp_path, CONVERSATIONS)
    assert detect_format(lines) == "sharegpt"
    assert load_trace(lines) == array


def test_equal_histories_share_their_tokens_across_conversations(tmp_path: Path) -> None:
    system = {"from": "system", "value": "You are a helpful assistant. " * 20}
    items = [
        {"conversations": [system, {"from": "human", "value": f"question {i}"},
                           {"from": "gpt", "value": "answer"}]}
        for i in range(3)
    ]  # fmt: skip
    a, b, _ = load_trace(write_array(tmp_path, items))
    num_system = 1 + len(HashTokenizer().encode(system["value"]))
    shared = next(
        i
        for i, (x, y) in enumerate(zip(a.prompt_token_ids, b.prompt_token_ids, strict=False))
        if x != y
    )
    # system header and text, user header, "question" (8 bytes: 2 tokens), then the number.
    assert shared == num_system + 1 + 2


BAD = [
    ("not an object", [1], 2, "expected a JSON object"),
    ("no turns", [{"id": "x"}], 2, "field 'conversations': missing"),
    ("turns not a list", [{"conversations": "hi"}], 2, "field 'conversations': expected a list"),
    ("bad text", [{"conversations": [{"from": "human", "value": 5}]}], 2,
     "field 'conversations[0].value'"),
    ("no speaker", [{"conversations": [{"value": "hi"}]}], 2, "field 'conversations[0].from'"),
    ("bad id", [{"id": True, "conversations": []}], 2, "field 'id'"),
    # OpenAI-style turns are named by their own keys
    ("bad content", [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}], 2,
     "field 'messages[0].content': expected a string, got [{\"type\": \"text\"}]"),
    ("no role", [{"messages": [{"content": "hi"}]}], 2, "field 'messages[0].role'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("items", "line", "problem"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_a_malformed_conversation_names_file_line_and_field(
    tmp_path: Path, items: list[object], line: int, problem: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + json.dumps(items[0]) + "\n")
    with pytest.raises(TraceFormatError) as caught:
        load_trace(path, format="sharegpt")
    assert str(caught.value).startswith(f"{path}:{line}: "), str(caught.value)
    assert problem in str(caught.value)
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        assert len(load_trace(path, format="sharegpt", skip_bad_lines=True)) == 2


def test_array_errors_name_the_line_where_the_conversation_starts(tmp_path: Path) -> None:
    items = [*CONVERSATIONS, {"id": "alpha", "conversations": []}]
    path = write_array(tmp_path, items)
    text = path.read_text()
    line = text[: text.rindex('"id": "alpha"')].count("\n")  # the line of its "{"
    with pytest.raises(TraceFormatError, match=rf":{line}: field 'id': duplicate .* line 2\)"):
        load_trace(path)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []},\n {"conversations": [}]')
    with pytest.raises(TraceFormatError, match=r"broken\.json:2: invalid JSON"):
        load_trace(broken, format="sharegpt")


def test_the_builtin_tokenizer_counts_words_pieces_and_punctuation() -> None:
    tok = HashTokenizer()
    assert len(tok.encode("Hello, world!")) == 4
    assert len(tok.encode("internationalization")) == 4  # 20 bytes, 6 per token
    assert len(tok.encode("日本語のテキスト")) == 4  # 8 characters, 24 bytes
    assert tok.encode("   \n\t") == []
    assert tok.encode("a b a") == [tok.encode("a")[0], tok.encode("b")[0], tok.encode("a")[0]]
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 50)
    assert min(ids) >= RESERVED_IDS and max(ids) < VOCAB_SIZE
    assert tok.role_header("user") == (USER,) and tok.role_header("tool") == (4,)
    assert load_tokenizer(None).encode("Hello, world!") == tok.encode("Hello, world!")


def test_the_builtin_tokenizer_is_the_same_in_another_process() -> None:
    text = "Determinism: the same text, the same ids — in every process."
    code = (
        "from kvflow.traces.text_tokenizer import HashTokenizer; "
        f"print(HashTokenizer().encode({text!r}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    repo_root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == str(HashTokenizer().encode(text))


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_a_named_tokenizer_needs_transformers_or_a_local_copy(tmp_path: Path) -> None:
    path = write_array(tmp_path, CONVERSATIONS)
    with pytest.raises(TokenizerError) as caught:
        load_trace(path, tokenizer="surely-not/a-tokenizer-anyone-has")
    message = str(caught.value)
    assert "\n" not in message, message  # the CLI's error is one line
    if HAS_TRANSFORMERS:
        assert "not available locally" in message and "never downloads" in message
    else:
        assert "needs the transformers package" in message and "built-in" in message


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_a_local_transformers_tokenizer_tokenizes_each_turn(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "Hello", "there", ",", "how", "are", "you", "?", "I", "am", "fine", "."]
    words += ["user", "assistant", ":", "Tell", "me", "a", "joke"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path / "tok"
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")  # type: ignore[no-untyped-call, unused-ignore]
    fast.save_pretrained(directory)
    tok = load_tokenizer(str(directory))
    assert tok.encode("Hello there, how are you?") == [1, 2, 3, 4, 5, 6, 7]
    prompts = session_prompts(
        [("user", "Hello there, how are you?"), ("assistant", "I am fine."),
         ("user", "Tell me a joke"), ("assistant", "?")],
        tok,
    )  # fmt: skip
    user, answer = (12, 14), (13, 14)
    assert prompts[0] == ((*user, 1, 2, 3, 4, 5, 6, 7, *answer), 4)
    assert prompts[1][0][: len(prompts[0][0])] == prompts[0][0]
    assert prompts[1][0][len(prompts[0][0]) :] == (8, 9, 10, 11, *user, 15, 16, 17, 18, *answer)
    requests = load_trace(write_array(tmp_path, CONVERSATIONS[:1]), tokenizer=str(directory))
    assert [r.prompt_token_ids for r in requests] == [p for p, _ in prompts]
