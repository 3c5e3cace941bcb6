"""Trace readers check every length before building tokens: an absurd length is an error
naming file, line and field and quoting the value, never an OverflowError or MemoryError,
and a file whose prompts add up to more than the RAM available is refused unbuilt."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from kvflow.kv.capacity import available_ram_bytes
from kvflow.traces.errors import TraceFormatError
from kvflow.traces.formats import load_trace
from kvflow.traces.formats._io import show
from kvflow.traces.limits import BYTES_PER_PROMPT_TOKEN, MAX_TRACE_TOKENS, check_length

BAD_JSON_LENGTHS: list[Any] = [10**18, 1e18, -5, 3.5, "abc", True, MAX_TRACE_TOKENS + 1]
BAD_CSV_LENGTHS = ["1e18", "-5", "3.5", "abc", "true", str(MAX_TRACE_TOKENS + 1), "1e300"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("field", ["prompt_len", "output_len"])
@pytest.mark.parametrize("value", BAD_JSON_LENGTHS, ids=repr)
def test_native_lengths_are_checked_before_tokens_are_built(
    tmp_path: Path, field: str, value: Any
) -> None:
    record = {"arrival_s": 0.0, "prompt_len": 8, "output_len": 4, field: value}
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            json.dumps({"format": "kvflow-trace", "version": 1}),
            json.dumps({"arrival_s": 0.0, "prompt_len": 8, "output_len": 4}),
            json.dumps(record),
        ],
    )
    with pytest.raises(TraceFormatError) as err:
        load_trace(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field {field!r}: ")
    assert message.endswith(f"got {show(value)}")


@pytest.mark.parametrize("field", ["input_length", "output_length"])
@pytest.mark.parametrize("value", BAD_JSON_LENGTHS, ids=repr)
def test_mooncake_lengths_are_checked_before_tokens_are_built(
    tmp_path: Path, field: str, value: Any
) -> None:
    record: dict[str, Any] = {"timestamp": 0, "input_length": 600, "output_length": 4}
    record[field] = value
    num_in = record["input_length"]
    num_ids = -(-num_in // 512) if type(num_in) is int and 0 < num_in < 2**40 else 2
    record["hash_ids"] = list(range(num_ids))
    good = {"timestamp": 0, "input_length": 10, "output_length": 4, "hash_ids": [0]}
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(good), json.dumps(record)])
    with pytest.raises(TraceFormatError) as err:
        load_trace(path, format="mooncake")
    message = str(err.value)
    assert message.startswith(f"{path}:2: field {field!r}: ")
    assert message.endswith(f"got {show(value)}")


def test_a_mooncake_block_size_over_the_cap_is_refused(tmp_path: Path) -> None:
    record = {"timestamp": 0, "input_length": 10**9, "output_length": 4, "hash_ids": [0]}
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match=r"hash_block_size=1073741824"):
        load_trace(path, format="mooncake", hash_block_size=2**30)


@pytest.mark.parametrize(
    ("fmt", "header", "columns"),
    [
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens", ("ContextTokens", "GeneratedTokens")),
        (
            "burstgpt",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
            ("Request tokens", "Response tokens"),
        ),
    ],
)
@pytest.mark.parametrize("text", BAD_CSV_LENGTHS)
@pytest.mark.parametrize("which", [0, 1])
def test_csv_lengths_are_checked_before_tokens_are_built(
    tmp_path: Path, fmt: str, header: str, columns: tuple[str, str], text: str, which: int
) -> None:
    cells = ["12", "4"]
    cells[which] = text
    if fmt == "azure":
        rows = ["2024-05-10 00:00:00.1,10,4", f"2024-05-10 00:00:01.2,{cells[0]},{cells[1]}"]
    else:
        rows = ["0.5,ChatGPT,10,4,14,Conversation log", f"1.5,ChatGPT,{cells[0]},{cells[1]},0,x"]
    path = write_lines(tmp_path / "t.csv", [header, *rows])
    with pytest.raises(TraceFormatError) as err:
        load_trace(path, format=fmt)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field {columns[which]!r}: ")
    assert message.endswith(f'got "{text}"')


def test_lengths_of_exactly_the_cap_are_read(tmp_path: Path) -> None:
    record = {"arrival_s": 0.0, "prompt_len": 8, "output_len": MAX_TRACE_TOKENS}
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(record)])
    (request,) = load_trace(path)
    assert request.max_new_tokens == MAX_TRACE_TOKENS
    # A prompt at the cap is read too (not built here: 16M tokens take seconds).
    assert check_length("prompt_len", MAX_TRACE_TOKENS, "x") == MAX_TRACE_TOKENS


def test_many_records_under_the_cap_that_add_up_past_ram_are_refused_unbuilt(
    tmp_path: Path,
) -> None:
    # Twice what fits: the RAM other processes free meanwhile cannot make it fit.
    num_lines = 2 * (available_ram_bytes() // (MAX_TRACE_TOKENS * BYTES_PER_PROMPT_TOKEN)) + 1
    line = json.dumps({"arrival_s": 0.0, "prompt_len": MAX_TRACE_TOKENS, "output_len": 1})
    path = write_lines(tmp_path / "t.jsonl", [line] * num_lines)
    assert path.stat().st_size < 1000 * num_lines  # a small file
    tracemalloc.start()
    try:
        with pytest.raises(TraceFormatError) as err:
            load_trace(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    message = str(err.value)
    assert message.startswith(f"{path}: its {num_lines} requests with ")
    assert "RAM available" in message


def test_a_sharegpt_conversation_whose_prompts_add_up_past_ram_is_refused_unbuilt(
    tmp_path: Path,
) -> None:
    from kvflow.traces.text_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    # Every assistant turn's prompt holds the whole conversation before it: n turns of
    # t tokens make prompts of ~t * n**2 / 4 tokens in all, from a file linear in n.
    per_turn = len(tokenizer.role_header("user")) + len(tokenizer.encode("ok"))
    budget_tokens = available_ram_bytes() // BYTES_PER_PROMPT_TOKEN
    # Prompts of 3x the RAM: what other processes free meanwhile cannot make them fit.
    num_turns = 2 * int((4 * 3 * budget_tokens / per_turn) ** 0.5) + 16
    assert num_turns * per_turn < MAX_TRACE_TOKENS  # each prompt is under the cap
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": "ok"} for i in range(num_turns)]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "long", "conversations": turns})])
    # Building the prompts would take more than the RAM available (MemoryError, or the
    # machine's memory): the error comes back instead, so they were never built.
    with pytest.raises(TraceFormatError, match="RAM available") as err:
        load_trace(path, format="sharegpt")
    assert str(err.value).startswith(f"{path}: its {num_turns // 2} requests with ")
