"""The issue's exactness bar through the offline API: `kvflow.LLM` over the async engine
and the tiered store, 32 concurrent prompts sharing prefixes, chunked prefill, a device
tier so small that requests swap out, blocks round-tripped through cpu and disk, and a
second pass served from those tiers; greedy tokens equal transformers' `generate`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kvflow  # noqa: E402
from kvflow.engine_adapters.factory import EngineName  # noqa: E402
from kvflow.engine_adapters.hf import save_random_hf_llama  # noqa: E402
from tests.integration.test_exactness import SPEC  # noqa: E402

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("llm-model")
    return path, save_random_hf_llama(SPEC, path, seed=3, init_std=0.2)


def shared_prefix_prompts(n: int = 32) -> list[list[int]]:
    rng = random.Random(1)
    prefixes = [[rng.randrange(SPEC.vocab_size) for _ in range(k)] for k in (13, 21, 9, 17)]
    return [
        prefixes[i % 4] + [rng.randrange(SPEC.vocab_size) for _ in range(rng.randint(1, 11))]
        for i in range(n)
    ]


@pytest.mark.parametrize("engine", ["torch", "hf"])
def test_llm_greedy_tokens_equal_generate_through_every_tier(
    model_dir: tuple[Path, Any], tmp_path: Path, engine: EngineName
) -> None:
    path, hf_model = model_dir
    prompts = shared_prefix_prompts()
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        expected.append(out[0, len(prompt) :].tolist())
    settings = {
        "kv.block_size": 4,
        "kv.device.num_blocks": 24,
        "kv.cpu.num_blocks": 16,
        "kv.disk.num_blocks": 128,
        "kv.disk.path": str(tmp_path / "kv.slab"),
        "kv.load_policy": "always",
        "scheduler.preemption_mode": "swap",
        "scheduler.long_prefill_threshold": 5,
        "scheduler.max_num_batched_tokens": 32,
        "scheduler.max_num_seqs": 8,
    }
    with kvflow.LLM(path, engine=engine, settings=settings, dtype="float64") as llm:
        assert llm.generate(prompts, max_new_tokens=MAX_NEW_TOKENS) == expected
        again = llm.generate_outputs(prompts[::-1], max_new_tokens=MAX_NEW_TOKENS)
        moved = llm.store.stats.bytes_moved
        num_preemptions = llm.num_preemptions
    assert [o.token_ids for o in again] == expected[::-1]
    assert num_preemptions > 0  # the device tier is small enough that requests swap out
    assert sum(o.num_cached_tokens for o in again) > 0
    assert moved["device_to_cpu"] > 0
    assert moved["cpu_to_disk"] > 0
    assert moved["cpu_to_device"] > 0
    assert moved["disk_to_device"] > 0


def test_planning_the_next_step_during_a_step_changes_no_token(
    model_dir: tuple[Path, Any], tmp_path: Path
) -> None:
    path, _ = model_dir
    prompts = shared_prefix_prompts(16)
    settings = {
        "kv.block_size": 4,
        "kv.device.num_blocks": 40,
        "scheduler.long_prefill_threshold": 5,
        "scheduler.max_num_batched_tokens": 24,
        "scheduler.max_num_seqs": 6,
    }
    outputs = {}
    for overlap in (False, True):
        with kvflow.LLM(path, settings=settings, dtype="float64", overlap=overlap) as llm:
            outputs[overlap] = llm.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)
            if overlap:
                assert llm.num_overlapped_steps > 10
            else:
                assert llm.num_overlapped_steps == 0
            assert llm.store.device.num_used_blocks == 0
    assert outputs[True] == outputs[False]
    assert all(len(tokens) == MAX_NEW_TOKENS for tokens in outputs[True])
