"""Trace formats: Mooncake, Azure, BurstGPT, detection, bad lines."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvflow.request import Request
from kvflow.traces import (
    TRACE_FORMATS,
    BadLinesSkippedWarning,
    TraceFormatError,
    detect_format,
    load_trace,
    read_trace,
)
from kvflow.traces.distributions import Poisson, Uniform
from kvflow.traces.formats.azure import parse_timestamp_ns
from kvflow.traces.formats.mooncake import dump_mooncake, mooncake_records
from kvflow.traces.synthetic import SystemPrompts, WorkloadSpec, generate_workload
from kvflow.traces.tokens import VOCAB_SIZE, keyed_token_ids

REPO_ROOT = Path(__file__).resolve().parents[2]
MOONCAKE_EXCERPT = REPO_ROOT.parent / "shared" / "traces" / "mooncake_synthetic_tail.jsonl"


def write(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def moon(ts: int, num_in: int, num_out: int, ids: list[int]) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": num_in, "output_length": num_out, "hash_ids": ids}
    )


# Requests share leading blocks 1, 2, 3 in different amounts; every last block is
# partial and unique, except r4, which repeats r0 exactly.
MOONCAKE_LINES = [
    moon(1000, 1024 + 100, 5, [1, 2, 10]),
    moon(1500, 512 + 7, 3, [1, 11]),
    moon(4000, 1536 + 300, 9, [1, 2, 3, 12]),
    moon(4250, 200, 1, [13]),
    moon(9000, 1024 + 100, 2, [1, 2, 10]),
]
SHARED_IDS = {
    (0, 1): 1,
    (0, 2): 2,
    (1, 2): 1,
    (0, 4): 3,
    (1, 4): 1,
    (2, 4): 2,
}


def test_mooncake_lengths_arrivals_and_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "conv.jsonl", *MOONCAKE_LINES)
    requests = load_trace(path)
    assert detect_format(path) == "mooncake"
    assert [r.request_id for r in requests] == ["r0", "r1", "r2", "r3", "r4"]
    assert [len(r.prompt_token_ids) for r in requests] == [1124, 519, 1836, 200, 1124]
    assert [r.max_new_tokens for r in requests] == [5, 3, 9, 1, 2]
    # Milliseconds to seconds, counted from the first request.
    assert [r.arrival_time for r in requests] == [0.0, 0.5, 3.0, 3.25, 8.0]
    for r in requests:
        assert min(r.prompt_token_ids) >= 0 and max(r.prompt_token_ids) < VOCAB_SIZE


def test_mooncake_prefix_sharing_is_exactly_the_shared_hash_ids(tmp_path: Path) -> None:
    requests = load_trace(write(tmp_path, "conv.jsonl", *MOONCAKE_LINES))
    for i, j in itertools.combinations(range(len(requests)), 2):
        shared = common_prefix_len(requests[i].prompt_token_ids, requests[j].prompt_token_ids)
        if (i, j) == (0, 4):  # the same ids and length: the same prompt, partial block too
            assert shared == 1124
        else:
            assert shared == 512 * SHARED_IDS.get((i, j), 0), (i, j)


def test_mooncake_namespaces_keep_files_apart_unless_named_alike(tmp_path: Path) -> None:
    a = write(tmp_path, "a.jsonl", *MOONCAKE_LINES)
    b = write(tmp_path, "b.jsonl", *MOONCAKE_LINES)
    first_a, first_b = load_trace(a)[0], load_trace(b)[0]
    assert common_prefix_len(first_a.prompt_token_ids, first_b.prompt_token_ids) == 0
    same_a = load_trace(a, namespace="conv")[0]
    same_b = load_trace(b, namespace="conv")[0]
    assert same_a.prompt_token_ids == same_b.prompt_token_ids
    # The default namespace is the stem, so naming it changes nothing.
    assert load_trace(a, namespace="a")[0] == first_a
    # A file that is read twice gives the same tokens.
    assert load_trace(a)[0] == first_a


def test_keyed_tokens_extend_consistently_and_differ_between_keys() -> None:
    tokens = keyed_token_ids("ns\x1f42", 2000)
    assert len(tokens) == 2000 and min(tokens) >= 0 and max(tokens) < VOCAB_SIZE
    for n in (0, 1, 2, 15, 16, 17, 32, 33, 511, 512):
        assert keyed_token_ids("ns\x1f42", n) == tokens[:n]
    heads = {keyed_token_ids(f"ns\x1f{i}", 16) for i in range(2000)}
    assert len(heads) == 2000
    assert len({t[0] for t in heads}) > 1900  # first tokens: uniform over 32000 ids


def test_mooncake_block_size_option(tmp_path: Path) -> None:
    path = write(tmp_path, "small.jsonl", moon(0, 10, 1, [7, 8, 9]), moon(5, 8, 1, [7, 8]))
    with pytest.raises(TraceFormatError, match=r"small\.jsonl:1: field 'hash_ids'"):
        load_trace(path)
    first, second = load_trace(path, hash_block_size=4)
    assert common_prefix_len(first.prompt_token_ids, second.prompt_token_ids) == 8


def test_gzipped_traces_are_read(tmp_path: Path) -> None:
    path = tmp_path / "conv.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write("\n".join(MOONCAKE_LINES) + "\n")
    plain = load_trace(write(tmp_path, "conv.jsonl", *MOONCAKE_LINES))
    assert detect_format(path) == "mooncake"
    assert load_trace(path) == plain


MOONCAKE_MALFORMED = [
    ("ids too few", moon(0, 1025, 1, [1, 2]), "hash_ids", "expected ceil"),
    ("ids too many", moon(0, 512, 1, [1, 2]), "hash_ids", "= 1 ids for input_length 512"),
    ("negative id", moon(0, 10, 1, [-1]), "hash_ids", "integers >= 0"),
    ("string ids", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": "1"}',
     "hash_ids", "list"),
    ("zero output", moon(0, 10, 0, [1]), "output_length", "in [1, 16777216]"),
    ("float input", '{"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": [1]}',
     "input_length", "in [1, 16777216]"),
    ("negative time", moon(-5, 10, 1, [1]), "timestamp", ">= 0"),
    ("missing output", '{"timestamp": 0, "input_length": 1, "hash_ids": [1]}',
     "output_length", "missing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [case[1:] for case in MOONCAKE_MALFORMED],
    ids=[case[0] for case in MOONCAKE_MALFORMED],
)
def test_a_malformed_mooncake_line_names_file_line_and_field(
    tmp_path: Path, line: str, field: str, problem: str
) -> None:
    path = write(tmp_path, "t.jsonl", MOONCAKE_LINES[0], "", line)
    with pytest.raises(TraceFormatError) as caught:
        load_trace(path, format="mooncake")
    message = str(caught.value)
    assert message.startswith(f"{path}:3: field {field!r}: "), message
    assert problem in message


def test_skip_bad_lines_warns_once_with_a_count(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.jsonl",
        MOONCAKE_LINES[0],
        moon(10, 1025, 1, [1]),
        "{not json",
        MOONCAKE_LINES[1],
        "[1, 2]",
    )
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2: field 'hash_ids'"):
        load_trace(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = read_trace(path, skip_bad_lines=True)
    assert [r.request_id for r in loaded.requests] == ["r0", "r2"]
    assert loaded.num_bad_lines == 3
    assert [e.split(": ")[0] for e in loaded.bad_line_errors] == [
        f"{path}:2",
        f"{path}:3",
        f"{path}:5",
    ]
    skipped = [w for w in caught if issubclass(w.category, BadLinesSkippedWarning)]
    assert len(skipped) == 1
    warning = skipped[0].message
    assert isinstance(warning, BadLinesSkippedWarning)
    assert warning.num_bad_lines == 3 and "skipped 3 bad line(s)" in str(warning)
    # A clean file warns nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_trace(write(tmp_path, "ok.jsonl", *MOONCAKE_LINES)).num_bad_lines == 0


def test_the_real_mooncake_excerpt_loads() -> None:
    if not MOONCAKE_EXCERPT.exists():
        pytest.skip(f"{MOONCAKE_EXCERPT} is absent")
    raw = [json.loads(line) for line in MOONCAKE_EXCERPT.read_text().splitlines()]
    requests = load_trace(MOONCAKE_EXCERPT)
    assert len(requests) == len(raw) == 493
    assert [len(r.prompt_token_ids) for r in requests] == [x["input_length"] for x in raw]
    assert requests[0].arrival_time == 0.0
    assert requests[-1].arrival_time == (raw[-1]["timestamp"] - raw[0]["timestamp"]) / 1000
    # Rows 5 and 50 list the same ids with the same length: the same prompt.
    assert requests[5].prompt_token_ids == requests[50].prompt_token_ids
    # Leading ids in common are leading tokens in common, 512 per id.
    for i, j in [(0, 1), (2, 30), (3, 100), (7, 8)]:
        ids_i, ids_j = raw[i]["hash_ids"], raw[j]["hash_ids"]
        num_ids = common_prefix_len(tuple(ids_i), tuple(ids_j))
        shared = common_prefix_len(requests[i].prompt_token_ids, requests[j].prompt_token_ids)
        assert shared == min(512 * num_ids, len(requests[i].prompt_token_ids))


def test_mooncake_records_keep_sharing_at_block_granularity(tmp_path: Path) -> None:
    spec = WorkloadSpec(
        num_sessions=12,
        prompt_len=Uniform(100, 900),
        output_len=Uniform(50, 400),
        arrivals=Poisson(2.0),
        turns=Uniform(1, 4),
        think_time_s=1.0,
        system_prompts=SystemPrompts(3, 700),
        seed=5,
    )
    original = [record.to_request() for record in generate_workload(spec)]
    path = tmp_path / "synth.jsonl"
    dump_mooncake(original, path)
    loaded = load_trace(path, format="mooncake")
    assert [len(r.prompt_token_ids) for r in loaded] == [len(r.prompt_token_ids) for r in original]
    assert [r.max_new_tokens for r in loaded] == [r.max_new_tokens for r in original]
    num_shared = 0
    for a, b in itertools.combinations(range(len(original)), 2):
        before = common_prefix_len(original[a].prompt_token_ids, original[b].prompt_token_ids)
        after = common_prefix_len(loaded[a].prompt_token_ids, loaded[b].prompt_token_ids)
        assert after == 512 * (before // 512), (a, b, before, after)
        num_shared += after > 0
    assert num_shared > 20  # the workload does share system prompts and histories
    records = mooncake_records(original)
    assert all(len(r["hash_ids"]) == math.ceil(r["input_length"] / 512) for r in records)


# --- Azure -------------------------------------------------------------------------------

AZURE_2023 = [
    "TIMESTAMP,ContextTokens,GeneratedTokens",
    "2023-11-16 18:17:03.9799600,374,44",
    "2023-11-16 18:17:04.0319300,396,109",
    "2023-11-16 18:17:05.1000000,0,5",
    "2023-11-16 18:17:06.0000000,879,0",
    "2023-11-16 18:18:03.9799601,1,1",
]


def test_azure_2023_rows_become_requests_with_exact_arrivals(tmp_path: Path) -> None:
    path = write(tmp_path, "code.csv", *AZURE_2023)
    loaded = read_trace(path)
    assert loaded.format == "azure"
    requests = loaded.requests
    assert [r.request_id for r in requests] == ["r0", "r1", "r4"]
    assert [len(r.prompt_token_ids) for r in requests] == [374, 396, 1]
    assert [r.max_new_tokens for r in requests] == [44, 109, 1]
    # 7 fractional digits are kept: 100 ns resolution.
    assert [r.arrival_time for r in requests] == [0.0, 0.05197, 60.0000001]
    assert loaded.dropped == {"0 context tokens": 1, "0 generated tokens": 1}
    kept = load_trace(path, keep_failed=True)
    assert [(r.request_id, r.max_new_tokens) for r in kept] == [
        ("r0", 44),
        ("r1", 109),
        ("r3", 1),
        ("r4", 1),
    ]
    # No prefix information: prompts share nothing.
    for a, b in itertools.combinations(requests, 2):
        assert common_prefix_len(a.prompt_token_ids, b.prompt_token_ids) == 0


def test_azure_2024_timestamps_with_offsets_and_other_header_spellings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "conv_1week.csv",
        "timestamp, context_tokens , generated_tokens,extra",
        "2024-05-10 00:00:00.009930+00:00,2162,5,x",
        "2024-05-10 00:00:01+00:00,1000,12,y",
        "2024-05-10T02:00:00.5+02:00,10,2,z",
        "2024-05-09 19:00:02-05:00,20,3,w",
        "2024-05-10 00:00:03Z,20,3,w",
    )
    requests = load_trace(path)
    assert detect_format(path) == "azure"
    assert [r.request_id for r in requests] == ["r0", "r2", "r1", "r3", "r4"]
    assert [r.arrival_time for r in requests] == [0.0, 0.49007, 0.99007, 1.99007, 2.99007]


def test_azure_timestamp_parser() -> None:
    base = parse_timestamp_ns("1970-01-01 00:00:00")
    assert base == 0
    assert parse_timestamp_ns("1970-01-01 00:00:01.9799600") == 1_979_960_000
    assert parse_timestamp_ns("1970-01-01 01:00:00+01:00") == 0
    assert parse_timestamp_ns("1970-01-01 00:00:00-0030") == 1800 * 10**9
    for bad in ("2023-13-01 00:00:00", "yesterday", "2023-11-16", "2023-11-16 18:17:03.1234567890"):
        with pytest.raises(ValueError):
            parse_timestamp_ns(bad)
    for bad in (
        "2023-11-16 18:17:03+99:99",
        "2023-11-16 18:17:03-24:00",
        "2023-11-16 18:17:03+0160",
    ):
        with pytest.raises(ValueError, match="UTC offset"):
            parse_timestamp_ns(bad)
    assert parse_timestamp_ns("1970-01-01 23:59:00+23:59") == 0


AZURE_MALFORMED = [
    ("bad month", "2023-13-16 18:17:03.97,1,1", "TIMESTAMP"),
    ("not a time", "soon,1,1", "TIMESTAMP"),
    ("text tokens", "2023-11-16 18:17:03.97,many,1", "ContextTokens"),
    ("negative output", "2023-11-16 18:17:03.97,5,-1", "GeneratedTokens"),
    ("fractional", "2023-11-16 18:17:03.97,5,1.5", "GeneratedTokens"),
]


@pytest.mark.parametrize(
    ("row", "field"), [c[1:] for c in AZURE_MALFORMED], ids=[c[0] for c in AZURE_MALFORMED]
)
def test_a_malformed_azure_row_names_file_line_and_field(
    tmp_path: Path, row: str, field: str
) -> None:
    path = write(tmp_path, "a.csv", AZURE_2023[0], AZURE_2023[1], row)
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))}:3: field '{field}': "):
        load_trace(path)
    with pytest.warns(BadLinesSkippedWarning, match="skipped 1 bad line"):
        assert read_trace(path, skip_bad_lines=True).num_bad_lines == 1


def test_short_rows_and_missing_columns_are_named(tmp_path: Path) -> None:
    short = write(tmp_path, "s.csv", AZURE_2023[0], AZURE_2023[1], "2023-11-16 18:17:03.97,5")
    with pytest.raises(TraceFormatError, match=r"s\.csv:3: expected 3 columns, got 2"):
        load_trace(short)
    missing = write(tmp_path, "m.csv", "TIMESTAMP,ContextTokens,Other", "x,1,2")
    with pytest.raises(TraceFormatError, match=r"m\.csv:1: field 'GeneratedTokens': missing"):
        load_trace(missing, format="azure")
    header_only = write(tmp_path, "h.csv", AZURE_2023[0])
    assert load_trace(header_only) == []


# --- BurstGPT ----------------------------------------------------------------------------

BURSTGPT = [
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
    "5,ChatGPT,472,18,490,Conversation log",
    "45,ChatGPT,1087,0,1087,Conversation log",
    "118.5,GPT-4,417,276,693,API log",
    "120,GPT-4,0,3,3,API log",
    "121,ChatGPT,20,1,21,Conversation log",
]


def test_burstgpt_skips_failures_with_a_count_or_keeps_them(tmp_path: Path) -> None:
    path = write(tmp_path, "BurstGPT_1.csv", *BURSTGPT)
    loaded = read_trace(path)
    assert loaded.format == "burstgpt"
    assert [r.request_id for r in loaded.requests] == ["r0", "r2", "r4"]
    assert [len(r.prompt_token_ids) for r in loaded.requests] == [472, 417, 20]
    assert [r.max_new_tokens for r in loaded.requests] == [18, 276, 1]
    assert [r.arrival_time for r in loaded.requests] == [0.0, 113.5, 116.0]
    assert loaded.dropped == {"failed (0 response tokens)": 1, "0 request tokens": 1}
    kept = read_trace(path, keep_failed=True)
    assert [(r.request_id, r.max_new_tokens) for r in kept.requests][1] == ("r1", 1)
    assert len(kept.requests) == 4 and kept.dropped == {"0 request tokens": 1}


def test_burstgpt_newer_columns_are_ignored_and_bad_fields_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "b.csv",
        "Timestamp,Session ID,Model,Request tokens,Response tokens,Total tokens,Log Type,"
        "Elapsed time",
        "1,s1,ChatGPT,10,2,12,Conversation log,0.5",
        "x,s1,ChatGPT,10,2,12,Conversation log,0.5",
    )
    with pytest.raises(TraceFormatError, match=r"b\.csv:3: field 'Timestamp': "):
        load_trace(path)
    with pytest.warns(BadLinesSkippedWarning):
        (request,) = load_trace(path, skip_bad_lines=True)
    assert len(request.prompt_token_ids) == 10 and request.max_new_tokens == 2


# --- detection and the registry ----------------------------------------------------------


def test_every_format_is_registered_and_callable(tmp_path: Path) -> None:
    assert list(TRACE_FORMATS) == ["native", "mooncake", "azure", "burstgpt", "sharegpt"]
    path = write(tmp_path, "conv.jsonl", *MOONCAKE_LINES)
    assert TRACE_FORMATS["mooncake"](path) == load_trace(path)
    assert "nope" not in TRACE_FORMATS


# One good record then one malformed record, in each built-in format.
ONE_BAD_LINE = {
    "native": ('{"arrival_s": 0, "prompt_len": 8, "output_len": 2}', '{"arrival_s": -1}'),
    "mooncake": (MOONCAKE_LINES[0], "{not json"),
    "azure": (*AZURE_2023[:2], "soon,1,1"),
    "burstgpt": (*BURSTGPT[:2], "5,ChatGPT,many,18,490,Conversation log"),
    "sharegpt": (
        json.dumps(
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
        ),
        json.dumps({"conversations": "hi"}),
    ),
}


@pytest.mark.parametrize("format_name", ONE_BAD_LINE)
def test_skip_bad_lines_counts_and_warns_the_same_in_every_format(
    tmp_path: Path, format_name: str
) -> None:
    suffix = ".csv" if format_name in ("azure", "burstgpt") else ".jsonl"
    lines = ONE_BAD_LINE[format_name]
    path = write(tmp_path, f"t{suffix}", *lines)
    assert detect_format(path) == format_name
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))}:{len(lines)}: "):
        read_trace(path)
    with pytest.warns(BadLinesSkippedWarning, match="skipped 1 bad line") as caught:
        loaded = read_trace(path, skip_bad_lines=True)
    assert len(caught) == 1
    assert len(loaded.requests) == 1 and loaded.num_bad_lines == 1
    assert loaded.bad_line_errors[0].startswith(f"{path}:{len(lines)}: ")


def test_detection_needs_a_known_first_line(tmp_path: Path) -> None:
    for name, first in [("x.csv", "a,b,c"), ("x.jsonl", '{"prompt": "hi"}'), ("x.txt", "hello")]:
        path = write(tmp_path, name, first, "1,2,3")
        with pytest.raises(TraceFormatError, match=r"cannot tell the trace format") as caught:
            load_trace(path)
        assert "native, mooncake, azure, burstgpt, sharegpt" in str(caught.value)
    path = write(tmp_path, "conv.jsonl", *MOONCAKE_LINES)
    with pytest.raises(TraceFormatError, match="unknown trace format 'moon'"):
        load_trace(path, format="moon")
    with pytest.raises(ValueError, match="invalid trace option"):
        load_trace(path, namespcae="x")
    with pytest.raises(TraceFormatError, match=r"cannot read trace file"):
        load_trace(tmp_path / "missing.jsonl")


def test_requests_are_plain_requests(tmp_path: Path) -> None:
    path = write(tmp_path, "code.csv", *AZURE_2023)
    assert all(type(r) is Request for r in load_trace(path))
