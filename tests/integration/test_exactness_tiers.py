"""Exactness with the tiered store: the torch runner computes over the device tier's
tensor while real copies swap preempted requests' blocks to cpu, spill them to disk,
and bring prefix hits back from both; greedy tokens still equal transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvflow.engine_adapters.hf import save_random_hf_llama  # noqa: E402
from kvflow.engine_adapters.torch import TorchLlama, TorchRunner  # noqa: E402
from kvflow.kv.store import KVStore  # noqa: E402
from kvflow.scheduler import Scheduler  # noqa: E402
from kvflow.traces.replay import make_policy  # noqa: E402
from tests.builders import make_config, run_over_real_copies  # noqa: E402
from tests.integration.test_exactness import SPEC, make_requests, reference_outputs  # noqa: E402


def test_greedy_tokens_survive_swaps_and_hits_from_every_tier(tmp_path: Path) -> None:
    hf_model = save_random_hf_llama(SPEC, tmp_path / "model", seed=3, init_std=0.2)
    requests = make_requests(24)
    expected = reference_outputs(hf_model, requests)
    config = make_config(
        **{
            "kv.block_size": 4,
            "kv.device.num_blocks": 20,
            "kv.cpu.num_blocks": 12,
            "kv.disk.num_blocks": 64,
            "kv.disk.path": str(tmp_path / "kv.slab"),
            "kv.layout.num_layers": SPEC.num_layers,
            "kv.layout.num_kv_heads": SPEC.num_kv_heads,
            "kv.layout.head_dim": SPEC.head_dim,
            "kv.layout.dtype": SPEC.dtype,
            "kv.load_policy": "always",
            "scheduler.preemption_mode": "swap",
            "scheduler.long_prefill_threshold": 5,
            "scheduler.max_num_batched_tokens": 24,
            "scheduler.max_num_seqs": 6,
        }
    )
    store = KVStore.with_tensors(config.kv)
    try:
        scheduler = Scheduler(config, make_policy("fcfs", config), store)
        model = TorchLlama.from_pretrained(tmp_path / "model", dtype="float64", device="cpu")
        assert store.device_storage is not None
        runner = TorchRunner(model, 4, kv_cache=store.device_storage.data)
        states = [scheduler.add(r) for r in requests]
        run_over_real_copies(scheduler, runner, store)
    finally:
        store.close()
    stats = scheduler.stats
    assert stats.num_swaps > 0
    for tier in ("cpu", "disk"):  # loads from both, at first admissions or resumes
        assert stats.hit_tokens_by_tier[tier] + stats.readmission_hit_tokens_by_tier[tier] > 0
    assert {s.request_id: s.output_token_ids for s in states} == expected


def test_greedy_tokens_equal_after_a_restart_served_from_a_persistent_disk(
    tmp_path: Path,
) -> None:
    hf_model = save_random_hf_llama(SPEC, tmp_path / "model", seed=3, init_std=0.2)
    requests = make_requests(12)
    expected = reference_outputs(hf_model, requests)
    config = make_config(
        **{
            "kv.block_size": 4,
            "kv.device.num_blocks": 40,
            "kv.cpu.num_blocks": 8,
            "kv.disk.num_blocks": 256,
            "kv.disk.path": str(tmp_path / "kv.slab"),
            "kv.disk.persist": True,
            "kv.write_policy": "write_through",
            "kv.load_policy": "always",
            "kv.layout.num_layers": SPEC.num_layers,
            "kv.layout.num_kv_heads": SPEC.num_kv_heads,
            "kv.layout.head_dim": SPEC.head_dim,
            "kv.layout.dtype": SPEC.dtype,
        }
    )
    model = TorchLlama.from_pretrained(tmp_path / "model", dtype="float64", device="cpu")
    runs = []
    for _ in range(2):  # the second run is a new store on the first one's slab
        store = KVStore.with_tensors(config.kv, model_id="random-llama-seed-3")
        try:
            scheduler = Scheduler(config, make_policy("fcfs", config), store)
            assert store.device_storage is not None
            runner = TorchRunner(model, 4, kv_cache=store.device_storage.data)
            states = [scheduler.add(r) for r in make_requests(12)]  # fresh requests
            store.drain(run_over_real_copies(scheduler, runner, store))
        finally:
            store.close()
        runs.append((scheduler.stats, store.stats, states))
    (first, first_store, _), (second, second_store, states) = runs
    assert first_store.num_disk_blocks_recovered == 0
    assert second.prefix_hit_tokens > first.prefix_hit_tokens  # what it found on disk
    assert second_store.num_disk_blocks_recovered > 0
    assert second_store.num_disk_blocks_dropped == 0 and second_store.num_tier_errors == 0
    assert second.hit_tokens_by_tier["disk"] > 0  # first admissions served from disk
    assert {s.request_id: s.output_token_ids for s in states} == expected
