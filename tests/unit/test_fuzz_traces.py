"""Fuzzing every trace reader (native, Mooncake, ShareGPT, Azure, BurstGPT, and format
detection): records that are almost right, records of hostile values (huge and
negative numbers, NaN, wrong types, deep nesting), and raw bytes. Each file either
loads into requests a replay can take, or fails with `TraceFormatError` naming the
file; never another exception, a hang, or memory beyond a bound."""

from __future__ import annotations

import csv
import io
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from kvflow.traces import BadLinesSkippedWarning, TraceFormatError, read_trace
from kvflow.traces.limits import MAX_TRACE_TOKENS
from tests.fuzz_helpers import deeply_nested, dumps, fuzz, json_values, no_hang
from tests.guarantee_settings import examples

NUM_CASES = 200
"""Cases per format in the default run (ten times that in the slow one)."""


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes any hostile JSON value."""
    return st.one_of(strategy, strategy, strategy, json_values)


def records(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any subset of `fields` (each maybe hostile), sometimes an unknown key."""
    extra = st.dictionaries(st.text(max_size=6), json_values, max_size=1)
    return st.builds(
        lambda fixed, more: {**fixed, **more},
        st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in fields.items()}),
        st.one_of(st.just({}), st.just({}), extra),
    )


lengths = st.integers(0, 300)
times = st.floats(0, 1e4) | st.integers(0, 10**7)
names = st.text(max_size=6)
token_ids = st.lists(st.integers(0, 2**32 - 1) | st.integers(-3, 3), max_size=20)

NATIVE = records(
    {
        "arrival_s": times,
        "output_len": lengths,
        "prompt_len": lengths,
        "prompt_token_ids": token_ids,
        "prefix_group": names,
        "prefix_len": lengths,
        "id": names,
        "tenant": names,
        "priority": st.integers(-3, 3),
        "ttft_slo_ms": st.floats(0, 1e3),
        "tpot_slo_ms": st.floats(0, 1e3),
        "deadline_s": times,
    }
)
HEADER = st.sampled_from(
    [None, {"format": "kvflow-trace", "version": 1}, {"format": "kvflow-trace", "version": 9}]
)
MOONCAKE = records(
    {
        "timestamp": times,
        "input_length": st.integers(0, 2000),
        "output_length": lengths,
        "hash_ids": st.lists(st.integers(0, 50) | st.integers(-3, 2**64), max_size=6),
    }
)
ROLES = st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool", ""]) | names
TURN = st.one_of(
    records({"from": ROLES, "value": st.text(max_size=40)}),
    records({"role": ROLES, "content": st.text(max_size=40)}),
)
CONVERSATION = st.one_of(
    records({"id": names, "conversations": st.lists(TURN, max_size=5)}),
    records({"id": names, "messages": st.lists(TURN, max_size=5)}),
)
CSV_COLUMNS = {
    "azure": ["TIMESTAMP", "ContextTokens", "GeneratedTokens"],
    "burstgpt": ["Timestamp", "Model", "Request tokens", "Response tokens", "Log Type"],
}
CELLS = st.one_of(
    st.integers(-5, 3000).map(str),
    st.sampled_from(["", "1e18", "nan", "inf", "-0", "3.5", str(MAX_TRACE_TOKENS + 1), "x,y"]),
    st.sampled_from(["2023-11-16 18:15:46.6805900", "2024-05-10 00:00:00+00:00", "T"]),
    st.text(max_size=10),
)


@st.composite
def json_lines_file(draw: st.DrawFn, record: st.SearchStrategy[Any], header: bool) -> bytes:
    lines = []
    first = draw(HEADER) if header else None
    if first is not None:
        lines.append(dumps(first))
    lines += [dumps(r) for r in draw(st.lists(record, min_size=1, max_size=6))]
    if draw(st.booleans()):  # a line that is not what the format holds
        bad = draw(st.sampled_from(["", "{", "[1, 2]", "null", deeply_nested(), "\ufeff{}"]))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    return "\n".join(lines).encode()


@st.composite
def sharegpt_file(draw: st.DrawFn) -> bytes:
    conversations = draw(st.lists(CONVERSATION, min_size=1, max_size=4))
    if draw(st.booleans()):
        return dumps(conversations).encode()  # one JSON array
    return draw(json_lines_file(CONVERSATION, header=False))


@st.composite
def csv_file(draw: st.DrawFn, fmt: str) -> bytes:
    columns = list(CSV_COLUMNS[fmt])
    if draw(st.booleans()):
        columns = draw(st.permutations(columns))
    if draw(st.integers(0, 5)) == 0:
        columns = columns[: draw(st.integers(0, len(columns)))]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for _ in range(draw(st.integers(1, 6))):
        width = len(columns) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        writer.writerow(draw(st.lists(CELLS, min_size=max(0, width), max_size=max(0, width))))
    return out.getvalue().encode()


FILES: dict[str, st.SearchStrategy[bytes]] = {
    "native": json_lines_file(NATIVE, header=True),
    "mooncake": json_lines_file(MOONCAKE, header=False),
    "sharegpt": sharegpt_file(),
    "azure": csv_file("azure"),
    "burstgpt": csv_file("burstgpt"),
}


@pytest.fixture(scope="module")
def trace_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "fuzz-trace"


def load_or_refuse(path: Path, data: bytes, fmt: str, skip: bool) -> bool:
    """Read `data` as a trace: it loads into sane requests (True) or fails as documented
    (False)."""
    path.write_bytes(data)
    try:
        with no_hang(20), warnings.catch_warnings():
            warnings.simplefilter("ignore", BadLinesSkippedWarning)  # skipping is the point
            trace = read_trace(path, fmt, skip_bad_lines=skip)
    except TraceFormatError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        assert "Traceback" not in message
        event(f"{fmt}: refused")
        return False
    arrivals = [r.arrival_time for r in trace.requests]
    assert arrivals == sorted(arrivals) and all(math.isfinite(a) and a >= 0 for a in arrivals)
    for r in trace.requests:
        assert 1 <= len(r.prompt_token_ids) <= MAX_TRACE_TOKENS
        assert 1 <= r.max_new_tokens <= MAX_TRACE_TOKENS
        assert all(0 <= t < 2**32 for t in r.prompt_token_ids)
    assert len({r.request_id for r in trace.requests}) == len(trace.requests)
    event(f"{fmt}: loaded {min(len(trace.requests), 2)}+ requests")
    return True


def fuzz_format(fmt: str, slow: bool, trace_path: Path) -> None:
    def check(data: bytes, skip: bool, auto: bool) -> bool:
        return load_or_refuse(trace_path, data, "auto" if auto else fmt, skip)

    fuzz(
        f"trace fuzz {fmt}",
        NUM_CASES,
        slow,
        check,
        data=FILES[fmt],
        skip=st.booleans(),
        auto=st.booleans(),
    )


@pytest.mark.parametrize("fmt", list(FILES))
def test_fuzzed_traces_load_or_fail_as_documented(fmt: str, trace_path: Path) -> None:
    fuzz_format(fmt, False, trace_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FILES))
def test_fuzzed_traces_load_or_fail_as_documented_slow(fmt: str, trace_path: Path) -> None:
    fuzz_format(fmt, True, trace_path)


@examples(NUM_CASES)
@given(data=st.binary(max_size=300), fmt=st.sampled_from(["auto", *FILES]))
def test_random_bytes_are_refused_as_documented(data: bytes, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        load_or_refuse(Path(tmp) / "bytes.jsonl", data, fmt, skip=False)


@pytest.mark.parametrize("fmt", ["native", "mooncake", "sharegpt"])
def test_json_nested_past_the_recursion_limit_is_a_bad_line(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text(deeply_nested() + "\n")
    with pytest.raises(TraceFormatError, match=r"deep\.jsonl:1: .*nest"):
        read_trace(path, fmt)


NATIVE_RECORD = {"arrival_s": 0, "prompt_len": 3, "output_len": 2}
MOONCAKE_RECORD = {"timestamp": 0, "input_length": 3, "output_length": 2, "hash_ids": [1]}


@pytest.mark.parametrize(
    ("fmt", "record", "field"),
    [
        ("native", NATIVE_RECORD, "arrival_s"),
        ("native", NATIVE_RECORD, "deadline_s"),
        ("native", NATIVE_RECORD, "ttft_slo_ms"),
        ("mooncake", MOONCAKE_RECORD, "timestamp"),
    ],
)
def test_an_integer_past_floats_range_is_a_bad_field(
    fmt: str, record: dict[str, Any], field: str, tmp_path: Path
) -> None:
    """JSON integers are unbounded: one no float holds is refused, not an OverflowError
    (the fuzz run found it)."""
    path = tmp_path / "huge.jsonl"
    path.write_text(dumps({**record, field: 10**400}) + "\n")
    with pytest.raises(TraceFormatError, match=rf"huge\.jsonl:1: field '{field}'"):
        read_trace(path, fmt)
