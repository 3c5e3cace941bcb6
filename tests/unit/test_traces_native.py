"""The native trace format, synthesised prompts, synthetic workloads, the bundled sample."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvflow.request import SLO, Request
from kvflow.traces import (
    BadLinesSkippedWarning,
    TraceFormatError,
    bundled_sample_path,
    dump_native,
    load_native,
    load_trace,
)
from kvflow.traces.make_sample import build_sample
from kvflow.traces.native import TraceRecord, read_native
from kvflow.traces.synthetic import shared_prefix_workload
from kvflow.traces.tokens import (
    VOCAB_SIZE,
    group_prefix_token_ids,
    prompt_token_ids,
    random_token_ids,
)

GOOD = '{"arrival_s": 0.0, "prompt_len": 8, "output_len": 2}'


def write_trace(tmp_path: Path, *lines: str, name: str = "trace.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


# --- round trips -------------------------------------------------------------------------


def test_requests_round_trip_through_a_file(tmp_path: Path) -> None:
    requests = [
        Request("a", (1, 2, 3), 4, arrival_time=0.0),
        Request(
            "b",
            tuple(range(100)),
            1,
            arrival_time=0.25,
            priority=-2,
            tenant="t1",
            slo=SLO(ttft_ms=200.0, tpot_ms=25.5),
            deadline=0.5,
        ),
        Request("c", (2**32 - 1, 0), 7, arrival_time=1.0 / 3.0, slo=SLO(ttft_ms=1000)),
    ]
    path = tmp_path / "out.jsonl"
    dump_native(requests, path)
    assert json.loads(path.read_text().splitlines()[0]) == {"format": "kvflow-trace", "version": 1}
    assert load_native(path) == requests


def test_records_round_trip_compactly(tmp_path: Path) -> None:
    records = shared_prefix_workload(
        20,
        num_groups=3,
        prefix_len=64,
        suffix_len=(1, 40),
        output_len=(1, 9),
        rate_rps=5.0,
        num_tenants=2,
        tenant_slos=[SLO(ttft_ms=100.0), None],
        seed=3,
    )
    path = tmp_path / "synthetic.jsonl"
    dump_native(records, path)
    assert "prompt_token_ids" not in path.read_text()
    assert read_native(path) == records
    assert load_native(path) == [record.to_request() for record in records]


def test_header_is_optional_blank_lines_are_skipped_and_ids_default_to_index(
    tmp_path: Path,
) -> None:
    path = write_trace(
        tmp_path,
        '{"arrival_s": 2.0, "prompt_len": 8, "output_len": 2}',
        "",
        '{"id": "x", "arrival_s": 1.0, "prompt_token_ids": [5, 6], "output_len": 1}',
        "   ",
        '{"arrival_s": 1.0, "prompt_len": 3, "output_len": 1}',
    )
    requests = load_native(path)
    # Sorted by arrival; ties keep file order; default ids count request lines only.
    assert [r.request_id for r in requests] == ["x", "r2", "r0"]
    assert requests[0].prompt_token_ids == (5, 6)
    assert [len(r.prompt_token_ids) for r in requests] == [2, 3, 8]
    assert requests[0].tenant == "default" and requests[0].slo == SLO()


# --- synthesised prompts -----------------------------------------------------------------


def test_requests_of_a_group_share_exactly_the_prefix(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {
                "arrival_s": i / 10,
                "prompt_len": 64 + 17 * (i % 5) + 1,
                "prefix_group": "sys",
                "prefix_len": 64,
                "output_len": 1,
            }
        )
        for i in range(40)
    ]
    requests = load_native(write_trace(tmp_path, *lines))
    group = group_prefix_token_ids("sys", 65)
    for request in requests:
        assert request.prompt_token_ids[:64] == group[:64]
        # The first own token is never the group's next one, by construction.
        assert request.prompt_token_ids[64] != group[64]
    for a, b in itertools.combinations(requests, 2):
        assert common_prefix_len(a.prompt_token_ids, b.prompt_token_ids) == 64


def test_shorter_prefix_of_a_group_is_shared_exactly_with_longer_ones() -> None:
    short = prompt_token_ids("a", 100, group="g", prefix_len=16)
    long = prompt_token_ids("b", 100, group="g", prefix_len=80)
    assert common_prefix_len(short, long) == 16
    assert prompt_token_ids("c", 80, group="g", prefix_len=80) == long[:80]


def test_different_groups_and_ungrouped_requests_do_not_share_tokens() -> None:
    a = prompt_token_ids("r1", 256, group="g1", prefix_len=200)
    b = prompt_token_ids("r1", 256, group="g2", prefix_len=200)
    plain = prompt_token_ids("r1", 256)
    assert a[:200] != b[:200] and sum(x == y for x, y in zip(a[:200], b[:200], strict=True)) < 10
    assert common_prefix_len(plain, prompt_token_ids("r2", 256)) < 3


def test_generated_tokens_lie_in_the_vocabulary_and_streams_extend_consistently() -> None:
    tokens = random_token_ids(12345, 5001)
    assert len(tokens) == 5001 and min(tokens) >= 0 and max(tokens) < VOCAB_SIZE
    assert len(set(tokens)) > 4000
    for n in (0, 1, 2, 3, 7, 1000):
        assert random_token_ids(12345, n) == tokens[:n]
    # The group cache grows on demand without changing what was handed out before.
    first = group_prefix_token_ids("grow-me", 10)
    assert group_prefix_token_ids("grow-me", 3000)[:10] == first
    assert group_prefix_token_ids("grow-me", 10) == first


def test_tokens_are_identical_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json; from kvflow.traces.tokens import group_prefix_token_ids, prompt_token_ids;"
        "print(json.dumps([group_prefix_token_ids('system-7', 1024),"
        " prompt_token_ids('r9', 300, group='system-7', prefix_len=200)]))"
    )
    here = [
        list(group_prefix_token_ids("system-7", 1024)),
        list(prompt_token_ids("r9", 300, group="system-7", prefix_len=200)),
    ]
    repo_root = Path(__file__).resolve().parents[2]
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        assert json.loads(out.stdout) == here


# --- malformed lines ---------------------------------------------------------------------

MALFORMED = [
    ("missing output_len", '{"arrival_s": 0, "prompt_len": 4}', "output_len"),
    ("missing arrival_s", '{"prompt_len": 4, "output_len": 1}', "arrival_s"),
    ("missing prompt", '{"arrival_s": 0, "output_len": 1}', "prompt_len"),
    ("string arrival", '{"arrival_s": "soon", "prompt_len": 4, "output_len": 1}', "arrival_s"),
    ("negative arrival", '{"arrival_s": -1, "prompt_len": 4, "output_len": 1}', "arrival_s"),
    ("float output_len", '{"arrival_s": 0, "prompt_len": 4, "output_len": 2.5}', "output_len"),
    ("negative output_len", '{"arrival_s": 0, "prompt_len": 4, "output_len": -3}', "output_len"),
    ("bool prompt_len", '{"arrival_s": 0, "prompt_len": true, "output_len": 1}', "prompt_len"),
    ("zero prompt_len", '{"arrival_s": 0, "prompt_len": 0, "output_len": 1}', "prompt_len"),
    ("unknown key", '{"arrival_s": 0, "prompt_len": 4, "output_len": 1, "lora": "x"}', "lora"),
    (
        "negative token",
        '{"arrival_s": 0, "prompt_token_ids": [1, -1], "output_len": 1}',
        "prompt_token_ids",
    ),
    (
        "token too large",
        '{"arrival_s": 0, "prompt_token_ids": [4294967296], "output_len": 1}',
        "prompt_token_ids",
    ),
    (
        "float token",
        '{"arrival_s": 0, "prompt_token_ids": [1.5], "output_len": 1}',
        "prompt_token_ids",
    ),
    (
        "empty tokens",
        '{"arrival_s": 0, "prompt_token_ids": [], "output_len": 1}',
        "prompt_token_ids",
    ),
    (
        "tokens and length",
        '{"arrival_s": 0, "prompt_token_ids": [1], "prompt_len": 1, "output_len": 1}',
        "prompt_len",
    ),
    (
        "group with tokens",
        '{"arrival_s": 0, "prompt_token_ids": [1], "prefix_group": "g", "output_len": 1}',
        "prefix_group",
    ),
    (
        "prefix too long",
        '{"arrival_s": 0, "prompt_len": 4, "prefix_group": "g", "prefix_len": 5, "output_len": 1}',
        "prefix_len",
    ),
    (
        "prefix without group",
        '{"arrival_s": 0, "prompt_len": 4, "prefix_len": 2, "output_len": 1}',
        "prefix_len",
    ),
    (
        "zero slo",
        '{"arrival_s": 0, "prompt_len": 4, "output_len": 1, "ttft_slo_ms": 0}',
        "ttft_slo_ms",
    ),
    (
        "deadline before arrival",
        '{"arrival_s": 2, "prompt_len": 4, "output_len": 1, "deadline_s": 1}',
        "deadline_s",
    ),
    ("numeric id", '{"id": 7, "arrival_s": 0, "prompt_len": 4, "output_len": 1}', "id"),
    ("numeric tenant", '{"arrival_s": 0, "prompt_len": 4, "output_len": 1, "tenant": 1}', "tenant"),
]


@pytest.mark.parametrize(
    ("line", "field"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_a_malformed_line_names_file_line_and_field(tmp_path: Path, line: str, field: str) -> None:
    path = write_trace(tmp_path, '{"format": "kvflow-trace", "version": 1}', GOOD, "", line)
    with pytest.raises(TraceFormatError) as caught:
        load_native(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: field {field!r}: "), message


def test_the_message_quotes_the_bad_value(tmp_path: Path) -> None:
    path = write_trace(tmp_path, GOOD, '{"arrival_s": 0, "prompt_len": 4, "output_len": -3}')
    with pytest.raises(
        TraceFormatError,
        match=r"trace\.jsonl:2: field 'output_len': expected an integer in \[1, 16777216\] "
        r"\(kvflow\.traces\.limits\.MAX_TRACE_TOKENS\), got -3$",
    ):
        load_native(path)


@pytest.mark.parametrize(
    "line", ['{"arrival_s": 0, "prompt_len": 4', "not json", '{"arrival_s": 0,}', "[1, 2]"]
)
def test_a_line_that_is_not_a_json_object_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = write_trace(tmp_path, GOOD, line, GOOD)
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))}:2: "):
        load_native(path)


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    dup = '{"id": "same", "arrival_s": 0, "prompt_len": 4, "output_len": 1}'
    path = write_trace(tmp_path, dup, GOOD, dup)
    with pytest.raises(TraceFormatError) as caught:
        load_native(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: field 'id': ") and "line 1" in message, message


def test_a_default_id_colliding_with_an_explicit_one_is_a_duplicate(tmp_path: Path) -> None:
    path = write_trace(tmp_path, GOOD.replace("{", '{"id": "r1", '), GOOD)
    with pytest.raises(TraceFormatError, match=r":2: field 'id': .*line 1"):
        load_native(path)


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ('{"format": "kvflow-trace", "version": 2}', "version"),
        ('{"format": "other", "version": 1}', "format"),
        ('{"format": "kvflow-trace", "version": 1, "x": 1}', "x"),
    ],
)
def test_a_bad_header_is_an_error(tmp_path: Path, header: str, field: str) -> None:
    path = write_trace(tmp_path, header, GOOD)
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))}:1: field '{field}'"):
        load_native(path)


def test_load_native_skips_bad_lines_with_one_warning_that_counts_them(tmp_path: Path) -> None:
    bad = '{"arrival_s": 0, "prompt_len": 4, "output_len": -3}'
    path = write_trace(tmp_path, GOOD, bad, "not json", GOOD.replace("0.0", "1.0"))
    with pytest.raises(TraceFormatError, match=r"trace\.jsonl:2: field 'output_len'"):
        load_native(path)
    with pytest.warns(BadLinesSkippedWarning) as caught:
        requests = load_native(path, skip_bad_lines=True)
    assert [(r.request_id, r.arrival_time) for r in requests] == [("r0", 0.0), ("r1", 1.0)]
    (warning,) = [w.message for w in caught]
    assert isinstance(warning, BadLinesSkippedWarning)
    assert warning.num_bad_lines == 2 and "skipped 2 bad line(s)" in str(warning)
    assert [e.split(": ")[0] for e in warning.first_errors] == [f"{path}:2", f"{path}:3"]
    with pytest.warns(BadLinesSkippedWarning):
        assert requests == load_trace(path, skip_bad_lines=True)


def test_a_missing_file_is_a_trace_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"nope\.jsonl"):
        load_native(tmp_path / "nope.jsonl")


def test_records_built_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="field 'output_len'"):
        TraceRecord(request_id="a", arrival_s=0.0, output_len=0, prompt_len=4)


# --- load_trace --------------------------------------------------------------------------


def test_load_trace_detects_native_files(tmp_path: Path) -> None:
    path = write_trace(tmp_path, GOOD)
    assert load_trace(path) == load_trace(path, format="native") == load_native(path)


def test_load_trace_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    unknown = tmp_path / "other.csv"
    unknown.write_text("time,prompt,answer\n0,1,2\n")
    with pytest.raises(TraceFormatError, match=r"other\.csv: cannot tell the trace format"):
        load_trace(unknown)
    mooncake = write_trace(tmp_path, '{"timestamp": 0, "input_length": 9, "hash_ids": [1]}')
    with pytest.raises(TraceFormatError, match=r"trace.jsonl:1: field 'output_length'"):
        load_trace(mooncake)
    with pytest.raises(TraceFormatError, match=r"trace.jsonl: unknown trace format 'csv'"):
        load_trace(mooncake, format="csv")


# --- synthetic workloads and the bundled sample ------------------------------------------


def test_synthetic_workloads_are_deterministic_and_follow_their_arguments() -> None:
    def make(seed: int = 0, **overrides: object) -> list[TraceRecord]:
        args: dict[str, object] = {
            "num_groups": 4,
            "prefix_len": 32,
            "suffix_len": (4, 9),
            "output_len": 5,
            "rate_rps": 10.0,
            "num_tenants": 3,
        }
        args.update(overrides)
        return shared_prefix_workload(200, seed=seed, **args)  # type: ignore[arg-type]

    records = make()
    assert records == make() and records != make(seed=1)
    arrivals = [r.arrival_s for r in records]
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 40  # ~200 / 10 rps
    assert {r.prompt_len for r in records} <= set(range(36, 42))
    assert {r.output_len for r in records} == {5}
    assert {r.tenant for r in records} == {"t0", "t1", "t2"}
    assert {r.prefix_group for r in records} == {f"s0-g{i}" for i in range(4)}
    assert all(r.arrival_s == 0.0 for r in make(rate_rps=None))
    # Changing the group skew reshuffles groups only, not arrivals or lengths.
    skewed = make(group_skew=2.0)
    assert [r.arrival_s for r in skewed] == arrivals
    counts = Counter(r.prefix_group for r in skewed)
    assert counts.most_common(1)[0][0] == "s0-g0" and counts["s0-g0"] > 100


def test_the_bundled_sample_is_what_make_sample_generates(tmp_path: Path) -> None:
    path = tmp_path / "sample.jsonl"
    dump_native(build_sample(), path)
    assert path.read_bytes() == bundled_sample_path().read_bytes()


def test_the_bundled_sample_has_shared_prefixes_tenants_and_slos() -> None:
    records = read_native(bundled_sample_path())
    requests = load_trace(bundled_sample_path())
    assert 250 <= len(requests) <= 400
    assert len({r.prefix_group for r in records}) == 64
    assert {r.prefix_len for r in records} == {1024}
    assert {r.tenant for r in requests} == {"t0", "t1"}
    assert {(r.tenant, r.priority) for r in requests} == {("t0", 0), ("t1", 1)}
    assert all(r.slo.ttft_ms is not None and r.slo.tpot_ms is not None for r in requests)
    rate = len(requests) / requests[-1].arrival_time
    assert 40 <= rate <= 80  # a queue forms under the default device tier
