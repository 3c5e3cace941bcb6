"""Replays through scheduler + tiered store: hits from every tier, in virtual time and
with real copies."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kvflow.config import KVFlowConfig
from kvflow.kv.store import KVStore
from kvflow.request import Request
from kvflow.traces.replay import ReplayResult, replay

BS = 16
TINY_LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}


def revisiting_workload(num_requests: int = 60, seed: int = 3) -> list[Request]:
    """Requests, one at a time (no overlap), over 12 prefixes of 2-5 blocks that come
    back after other prefixes have pushed them out of a small device tier."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(BS * rng.randint(2, 5))] for _ in range(12)]
    return [
        Request(
            request_id=f"q{i}",
            prompt_token_ids=rng.choice(prefixes) + [rng.randrange(32000) for _ in range(9)],
            max_new_tokens=3,
            arrival_time=1.0 * i,  # each finishes long before the next arrives
        )
        for i in range(num_requests)
    ]


def ideal_hit_tokens(requests: list[Request]) -> int:
    """Every full prompt block seen before (as a whole prefix) is a hit, up to the last
    block a request may reuse (one token is always computed)."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for r in sorted(requests, key=lambda r: r.arrival_time):
        tokens = r.prompt_token_ids
        usable = (len(tokens) - 1) // BS
        j = 0
        while j < usable and tuple(tokens[: (j + 1) * BS]) in seen:
            j += 1
        total += j * BS
        seen.update(tuple(tokens[: (k + 1) * BS]) for k in range(len(tokens) // BS))
    return total


def run(
    requests: list[Request], kv: Mapping[str, Any], store: KVStore | None = None
) -> ReplayResult:
    config = KVFlowConfig.from_dict(
        {}, {"kv.block_size": BS, **{f"kv.{k}": v for k, v in kv.items()}}
    )
    return replay(requests, config, "fcfs", store=store, check_integrity=True)


def test_lower_tiers_recover_hits_a_small_device_tier_loses() -> None:
    requests = revisiting_workload()
    ideal = ideal_hit_tokens(requests)
    device_only = run(requests, {"device.num_blocks": 8})
    tiered = run(requests, {"device.num_blocks": 8, "cpu.num_blocks": 12, "disk.num_blocks": 64})
    assert device_only.stats.prefix_hit_tokens < tiered.stats.prefix_hit_tokens
    by_tier = tiered.stats.hit_tokens_by_tier
    assert by_tier["cpu"] > 0 and by_tier["disk"] > 0
    assert sum(by_tier.values()) == tiered.stats.prefix_hit_tokens <= ideal
    assert tiered.store_stats.bytes_moved["disk_to_device"] > 0
    assert tiered.store_stats.num_promoted_blocks > 0
    assert tiered.num_leaked_blocks == 0
    # Loads cost virtual time: the requests served from disk waited for their KV.
    assert any(s.kv_wait_s > 0 for s in tiered.states)


def test_tiers_that_hold_everything_reach_the_ideal_hit_rate() -> None:
    requests = revisiting_workload()
    ideal = ideal_hit_tokens(requests)
    big = run(requests, {"device.num_blocks": 8, "cpu.num_blocks": 400, "disk.num_blocks": 400})
    assert big.stats.prefix_hit_tokens == ideal
    huge_device = run(requests, {"device.num_blocks": 2000})
    assert huge_device.stats.prefix_hit_tokens == ideal


def test_real_copies_reach_the_ideal_through_every_tier(tmp_path: Path) -> None:
    requests = revisiting_workload(30)
    ideal = ideal_hit_tokens(requests)
    kv = {
        "device.num_blocks": 8, "cpu.num_blocks": 12, "disk.num_blocks": 200,
        "layout": TINY_LAYOUT, "disk.path": str(tmp_path / "slab"),
    }  # fmt: skip
    virtual = run(requests, kv)
    config = KVFlowConfig.from_dict(
        {}, {"kv.block_size": BS, **{f"kv.{k}": v for k, v in kv.items()}}
    )
    store = KVStore.with_tensors(config.kv)
    try:
        real = run(requests, kv, store=store)
    finally:
        store.close()
    for result in (virtual, real):
        assert sum(s.num_cached_tokens for s in result.states) == ideal
        assert result.stats.hit_tokens_by_tier["disk"] > 0
    assert real.num_leaked_blocks == 0 and real.store_stats.num_tier_errors == 0


def persistent_config(tmp_path: Path, disk_blocks: int) -> KVFlowConfig:
    """Device 8 and cpu 12 blocks over a persistent disk tier of `disk_blocks` at
    `tmp_path / "slab"` (the restart tests' store)."""
    kv = {
        "device.num_blocks": 8, "cpu.num_blocks": 12, "disk.num_blocks": disk_blocks,
        "layout": TINY_LAYOUT, "disk.path": str(tmp_path / "slab"), "disk.persist": True,
    }  # fmt: skip
    return KVFlowConfig.from_dict(
        {}, {"kv.block_size": BS, **{f"kv.{k}": v for k, v in kv.items()}}
    )


def test_a_restarted_replay_finds_the_last_runs_blocks_on_a_persistent_disk(
    tmp_path: Path,
) -> None:
    from kvflow.traces.metrics import summarize_replay

    requests = revisiting_workload(30)
    config = persistent_config(tmp_path, disk_blocks=200)
    results = []
    for _ in range(2):  # two runs, one after the other, on the same slab
        store = KVStore.with_tensors(config.kv, model_id="tiny")
        try:
            results.append(replay(requests, config, "fcfs", store=store, check_integrity=True))
        finally:
            store.close()
    first, second = results
    assert first.store_stats.num_disk_blocks_recovered == 0
    # Everything the first run computed is on disk (200 blocks hold it all): the
    # second run computes no full prompt block it can reuse, even its first requests.
    assert second.store_stats.num_disk_blocks_recovered > 0
    assert second.store_stats.num_disk_blocks_dropped == 0
    usable = sum((len(r.prompt_token_ids) - 1) // BS * BS for r in requests)
    assert sum(s.num_cached_tokens for s in second.states) == usable
    assert sum(s.num_cached_tokens for s in first.states) < usable
    assert second.stats.hit_tokens_by_tier["disk"] > 0
    assert second.num_leaked_blocks == 0 and second.store_stats.num_tier_errors == 0
    report = summarize_replay(second).to_json()
    assert report["num_disk_blocks_recovered"] == second.store_stats.num_disk_blocks_recovered


def distinct_prompts(num: int, num_blocks: int, seed: int, start: float = 0.0) -> list[Request]:
    """`num` requests, one at a time, each with a prompt of `num_blocks` full blocks of
    its own (and one token more), sharing nothing."""
    rng = random.Random(seed)
    return [
        Request(
            request_id=f"d{seed}-{i}",
            prompt_token_ids=[rng.randrange(32000) for _ in range(BS * num_blocks + 1)],
            max_new_tokens=2,
            arrival_time=start + 1.0 * i,
        )
        for i in range(num)
    ]


def test_a_restarted_persistent_disk_evicts_its_recovered_chains_tail_first(
    tmp_path: Path,
) -> None:
    """Six 4-block prompts fill a 24-block persistent disk; after a restart, two new
    3-block prompts evict six recovered blocks. Each recovered chain must keep a prefix
    (its root first): a tail whose root is gone is a block no prefix match can reach."""
    config = persistent_config(tmp_path, disk_blocks=24)
    store = KVStore.with_tensors(config.kv, model_id="tiny")
    try:
        first = replay(distinct_prompts(6, 4, seed=1), config, "fcfs", store=store)
        chains = [list(s.block_keys[:4]) for s in first.states]
        assert store.disk is not None
        assert all(store.disk.lookup(k) is not None for chain in chains for k in chain)
    finally:
        store.close()
    store = KVStore.with_tensors(config.kv, model_id="tiny")
    try:
        assert store.stats.num_disk_blocks_recovered == 24
        second = replay(distinct_prompts(2, 3, seed=2), config, "fcfs", store=store)
        assert second.store_stats.num_tier_errors == 0
        disk = store.disk
        assert disk is not None
        held = [[disk.lookup(k) is not None for k in chain] for chain in chains]
    finally:
        store.close()
    assert sum(map(sum, held)) == 24 - 6  # six recovered blocks were evicted
    for chain_held in held:  # each chain: held blocks first, evicted ones after
        assert chain_held == sorted(chain_held, reverse=True), held


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_swaps_or_recomputes_as_configured(mode: str) -> None:
    rng = random.Random(0)
    requests = [
        Request(request_id=f"p{i}", prompt_token_ids=[rng.randrange(32000) for _ in range(40)],
                max_new_tokens=40)
        for i in range(6)
    ]  # fmt: skip
    config = KVFlowConfig.from_dict(
        {},
        {"kv.block_size": 8, "kv.device.num_blocks": 24, "kv.cpu.num_blocks": 64,
         "scheduler.preemption_mode": mode},
    )  # fmt: skip
    result = replay(requests, config, "fcfs", check_integrity=True)
    assert result.stats.num_preemptions > 0
    assert all(s.num_output_tokens == 40 for s in result.states)
    # Distinct prompts: no first admission finds anything; resuming is no prefix hit.
    assert result.stats.prefix_hit_tokens == 0
    resumed_from_cpu = result.stats.readmission_hit_tokens_by_tier["cpu"]
    if mode == "swap":
        assert result.stats.num_swaps == result.stats.num_preemptions
        assert resumed_from_cpu > 0  # resumed from the swapped blocks
    else:
        assert result.stats.num_swaps == 0
        assert resumed_from_cpu == 0
    assert result.num_leaked_blocks == 0


def test_the_replay_report_shows_hits_and_bytes_per_tier(tmp_path: Path) -> None:
    import json

    from kvflow.cli import main

    out = tmp_path / "r.json"
    settings = ["kv.device.num_blocks=1200", "kv.cpu.num_blocks=2000", "kv.disk.num_blocks=8000"]
    args = ["replay", "-p", "lpm", "--json", str(out)]
    for s in settings:
        args += ["--set", s]
    assert main(args) == 0
    run = json.loads(out.read_text())["runs"][0]
    by_tier = run["hit_tokens_by_tier"]
    assert set(by_tier) == {"device", "cpu", "disk", "peer"}  # peer: 0 with no remote tier
    assert by_tier["cpu"] > 0 and by_tier["disk"] > 0 and by_tier["peer"] == 0
    again = run["readmission_hit_tokens_by_tier"]
    loaded_from_disk = by_tier["disk"] + again["disk"]
    assert set(run["bytes_moved"]) == {
        "device_to_cpu", "cpu_to_device", "cpu_to_disk", "disk_to_device", "peer_to_cpu"
    }  # fmt: skip
    assert run["bytes_moved"]["peer_to_cpu"] == 0
    block_bytes = 16 * 2 * 32 * 8 * 128 * 2  # the default layout
    assert run["bytes_moved"]["disk_to_device"] == (loaded_from_disk // 16) * block_bytes
    promoted = by_tier["cpu"] + by_tier["disk"] + again["cpu"] + again["disk"]
    assert run["num_promoted_blocks"] * 16 == promoted
    assert run["num_tier_errors"] == 0 and run["num_leaked_blocks"] == 0
