"""Hit rates mean what a vLLM user reads in them: `prefix_hit_rate` counts first
admissions only; a preempted request re-finding its own blocks is reported apart."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from kvflow.cli import main

BS = 16


def shared_prefix_trace(num_requests: int = 80, seed: int = 7) -> list[dict[str, Any]]:
    """Native trace records: 10 shared prefixes of 4-8 blocks, each request one of them
    plus its own suffix, arriving at ~40 requests/s (they overlap, so a small device
    tier must preempt)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(BS * rng.randint(4, 8))] for _ in range(10)]
    records = []
    t = 0.0
    for i in range(num_requests):
        t += rng.expovariate(40.0)
        suffix = [rng.randrange(32000) for _ in range(rng.randint(5, 40))]
        records.append(
            {
                "id": f"r{i}",
                "arrival_s": round(t, 6),
                "prompt_token_ids": rng.choice(prefixes) + suffix,
                "output_len": rng.randint(20, 120),
            }
        )
    return records


def ideal_hit_rate(records: list[dict[str, Any]]) -> float:
    """An infinite cache: for each request in arrival order, the longest block-aligned
    prefix of its prompt seen in any earlier request's prompt (one token is always
    computed), over all prompt tokens."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for record in sorted(records, key=lambda r: r["arrival_s"]):
        tokens = record["prompt_token_ids"]
        usable = (len(tokens) - 1) // BS
        n = 0
        while n < usable and tuple(tokens[: (n + 1) * BS]) in seen:
            n += 1
        hit += n * BS
        total += len(tokens)
        seen.update(tuple(tokens[: (k + 1) * BS]) for k in range(len(tokens) // BS))
    return hit / total


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_prefix_hit_rate_counts_first_admissions_and_stays_under_the_ideal(
    mode: str, tmp_path: Path
) -> None:
    records = shared_prefix_trace()
    trace = tmp_path / "shared.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report.json"
    settings = [
        "kv.device.num_blocks=60",
        "kv.cpu.num_blocks=4000",
        f"scheduler.preemption_mode={mode}",
    ]
    args = ["replay", str(trace), "-p", "fcfs", "--json", str(out)]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["num_preemptions"] > 0  # the device tier is small enough to preempt
    assert run["num_finished"] == run["num_requests"] == len(records)

    assert run["num_prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in records)
    assert run["prefix_hit_rate"] == pytest.approx(
        run["num_cached_tokens"] / run["num_prompt_tokens"], rel=1e-12
    )
    assert run["prefix_hit_rate"] <= ideal_hit_rate(records)
    assert sum(run["hit_tokens_by_tier"].values()) == run["num_cached_tokens"]

    # Re-admissions after a preemption are reported apart, split by tier the same way.
    assert run["readmission_query_tokens"] > 0
    assert 0 <= run["readmission_hit_tokens"] <= run["readmission_query_tokens"]
    assert sum(run["readmission_hit_tokens_by_tier"].values()) == run["readmission_hit_tokens"]
    if mode == "swap":  # a swapped-out request finds its own blocks in the cpu tier
        assert run["readmission_hit_tokens_by_tier"]["cpu"] > 0
