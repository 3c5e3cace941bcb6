"""Trace formats through the replay and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.cli import build_parser, main
from kvflow.cli.common import load_requests
from kvflow.request import Request
from kvflow.traces import detect_format, load_trace
from kvflow.traces.native import read_native
from kvflow.traces.replay import replay
from tests.builders import make_config


def moon(ts_ms: int, num_in: int, num_out: int, ids: list[int]) -> str:
    return json.dumps(
        {"timestamp": ts_ms, "input_length": num_in, "output_length": num_out, "hash_ids": ids}
    )


# A prefix tree of hash ids: every request ends in a partial block of its own, so what
# it can share is whole 512-token blocks. Requests arrive 100 s apart: each finishes
# before the next arrives.
TREE = [
    ([1, 2, 3, 100], 1536 + 50),
    ([1, 2, 101], 1024 + 300),
    ([1, 2, 3, 4, 102], 2048 + 1),
    ([5, 103], 512 + 200),
    ([1, 104], 512 + 511),
    ([1, 2, 3, 4, 105], 2048 + 400),
    ([5, 6, 106], 1024 + 70),
    ([107], 333),
]


def expected_cached_tokens(tree: list[tuple[list[int], int]]) -> list[int]:
    """512 tokens per leading id shared with an earlier request."""
    out = []
    for i, (ids, _) in enumerate(tree):
        best = 0
        for earlier, _ in tree[:i]:
            n = 0
            while n < min(len(ids), len(earlier)) and ids[n] == earlier[n]:
                n += 1
            best = max(best, n)
        out.append(512 * best)
    return out


def write_tree(tmp_path: Path, tree: list[tuple[list[int], int]]) -> Path:
    path = tmp_path / "tree.jsonl"
    lines = [moon(100_000 * i, n, 4, ids) for i, (ids, n) in enumerate(tree)]
    path.write_text("\n".join(lines) + "\n")
    return path


def cached_tokens(requests: list[Request], block_size: int) -> tuple[list[int], int]:
    config = make_config(**{"kv.block_size": block_size, "kv.device.num_blocks": 4096})
    result = replay(requests, config, "lpm", check_integrity=True)
    by_id = {s.request_id: s.num_cached_tokens for s in result.states}
    return [by_id[r.request_id] for r in requests], result.stats.prefix_hit_tokens


def test_mooncake_sharing_does_not_depend_on_the_block_size(tmp_path: Path) -> None:
    requests = load_trace(write_tree(tmp_path, TREE))
    expected = expected_cached_tokens(TREE)
    assert expected == [0, 1024, 1536, 0, 512, 2048, 512, 0]
    per_request_16, total_16 = cached_tokens(requests, 16)
    per_request_64, total_64 = cached_tokens(requests, 64)
    assert per_request_16 == per_request_64 == expected
    assert total_16 == total_64 == sum(expected)


def test_a_fully_shared_prompt_differs_only_by_the_last_block(tmp_path: Path) -> None:
    # The second request is exactly the first one's first two blocks: all its tokens are
    # cached, but a request must compute its last token, so the hit stops one kvflow
    # block short, and that block depends on the block size.
    tree = [([1, 2, 3], 1536), ([1, 2], 1024)]
    requests = load_trace(write_tree(tmp_path, tree))
    for block_size in (16, 64):
        per_request, _ = cached_tokens(requests, block_size)
        assert per_request == [0, 1024 - block_size]


def test_multi_turn_conversations_reuse_each_earlier_prompt(tmp_path: Path) -> None:
    words = " ".join(f"word{i}" for i in range(300))
    turns = []
    for k in range(4):
        turns += [
            {"from": "human", "value": f"{k} {words}"},
            {"from": "gpt", "value": f"reply {k} " + words[: 40 * k]},
        ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"id": "c", "conversations": turns}]))
    requests = load_trace(path, think_time_s=100.0)
    assert [r.request_id for r in requests] == ["c-0", "c-1", "c-2", "c-3"]
    lengths = [len(r.prompt_token_ids) for r in requests]
    for block_size in (16, 64):
        per_request, _ = cached_tokens(requests, block_size)
        # the previous prompt's full blocks; the runner's outputs are not the trace's
        expected = [0] + [n // block_size * block_size for n in lengths[:-1]]
        assert per_request == expected


# --- the command line --------------------------------------------------------------------


def mooncake_file(tmp_path: Path, num: int = 10, bad_line: bool = False) -> Path:
    lines = [moon(1000 * i, 600, 3, [i, 1000 + i]) for i in range(num)]
    if bad_line:
        lines.insert(3, moon(0, 600, 3, [1]))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_replay(*args: str, tmp_path: Path) -> tuple[int, dict[str, object]]:
    out = tmp_path / "report.json"
    code = main(["replay", "-p", "fcfs", "--json", str(out), *args])
    return code, json.loads(out.read_text()) if code == 0 else {}


def test_replay_reads_and_shapes_traces_from_flags(tmp_path: Path) -> None:
    path = str(mooncake_file(tmp_path))
    code, doc = run_replay(path, "--format", "mooncake", "--limit", "4", tmp_path=tmp_path)
    assert code == 0
    runs = doc["runs"]
    assert isinstance(runs, list) and runs[0]["num_requests"] == 4
    code, doc = run_replay(path, "--window", "2.5:6", tmp_path=tmp_path)
    assert code == 0 and doc["runs"][0]["num_requests"] == 3  # type: ignore[index]


def test_shaping_flags_reach_the_requests(tmp_path: Path) -> None:
    path = str(mooncake_file(tmp_path))
    parser = build_parser()

    def arrivals(*flags: str) -> list[float]:
        return [r.arrival_time for r in load_requests(parser.parse_args(["replay", path, *flags]))]

    assert arrivals() == [float(i) for i in range(10)]
    assert arrivals("--time-scale", "0.5") == [i / 2 for i in range(10)]
    assert arrivals("--rate", "3") == pytest.approx([i / 3 for i in range(10)])
    assert arrivals("--window", "4:", "--limit", "2", "--rate", "0.5") == [0.0, 2.0]
    first = load_requests(parser.parse_args(["replay", path]))[0]
    renamed = load_requests(parser.parse_args(["replay", path, "--namespace", "other"]))[0]
    assert first.prompt_token_ids != renamed.prompt_token_ids


def test_skip_bad_lines_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(mooncake_file(tmp_path, bad_line=True))
    code, _ = run_replay(path, tmp_path=tmp_path)
    assert code == 2
    assert f"{path}:4: field 'hash_ids'" in capsys.readouterr().err
    code, doc = run_replay(path, "--skip-bad-lines", tmp_path=tmp_path)
    assert code == 0 and doc["runs"][0]["num_requests"] == 10  # type: ignore[index]
    assert "warning: skipped 1 bad line(s)" in capsys.readouterr().err


def test_bad_shaping_flags_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(mooncake_file(tmp_path))
    assert run_replay(path, "--rate", "2", "--time-scale", "2", tmp_path=tmp_path)[0] == 2
    assert "not both" in capsys.readouterr().err
    assert run_replay(path, "--window", "5:1", tmp_path=tmp_path)[0] == 2
    assert "bad window" in capsys.readouterr().err
    assert run_replay(path, "--format", "csv", tmp_path=tmp_path)[0] == 2
    assert "unknown trace format 'csv'" in capsys.readouterr().err


def test_synth_writes_native_and_mooncake_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synth.jsonl"
    args = ["synth", str(out), "-n", "20", "--turns", "2:3", "--think-time", "1.5"]
    args += ["--arrival", "gamma", "--rate", "4", "--cv", "2", "--prompt-len", "10:20"]
    args += ["--output-len", "5", "--system-prompts", "2", "--system-prompt-len", "64"]
    args += ["--tenant", "a,weight=2,ttft_ms=100,tpot_ms=10,priority=1", "--tenant", "b"]
    assert main(args) == 0
    assert "to " + str(out) in capsys.readouterr().out
    records = read_native(out)
    assert 40 <= len(records) <= 60 and {r.output_len for r in records} == {5}
    assert {(r.tenant, r.priority, r.ttft_slo_ms) for r in records} == {
        ("a", 1, 100.0),
        ("b", 0, None),
    }
    moon_out = tmp_path / "synth_moon.jsonl"
    assert main([*args[:1], str(moon_out), *args[2:], "--format", "mooncake"]) == 0
    assert detect_format(moon_out) == "mooncake"
    moon_requests = load_trace(moon_out)
    assert sorted(len(r.prompt_token_ids) for r in moon_requests) == sorted(
        r.num_prompt_tokens for r in records
    )
    assert main(["replay", str(out), "-p", "lpm"]) == 0
    assert main(["synth", str(out), "--tenant", "a,colour=red"]) == 2
    assert "bad --tenant" in capsys.readouterr().err


def test_the_bundled_multi_turn_sample_replays(capsys: pytest.CaptureFixture[str]) -> None:
    from kvflow.traces import bundled_samples

    assert main(["replay", str(bundled_samples()["multi-turn"]), "-p", "fcfs", "-p", "lpm"]) == 0
    assert "multiturn.jsonl" in capsys.readouterr().out
