"""The torch runner's pieces: model spec, paged KV layout, mixed batches, sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvflow.engine_adapters.torch import (
    BatchEntry,
    LlamaSpec,
    Sampler,
    TorchLlama,
    TorchRunner,
    build_batch,
    filter_logits,
    sample_seed,
)
from kvflow.request import Request, RequestState, SamplingParams
from kvflow.scheduler import StepPlan
from tests.builders import make_config, make_request, make_scheduler

SPEC = LlamaSpec(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    dtype="float64",
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> TorchLlama:
    return TorchLlama.random(SPEC, seed=1, device="cpu", init_std=0.3)


def hf_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
    }
    config.update(overrides)
    return config


# -- spec ----------------------------------------------------------------------------
def test_spec_reads_llama_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    spec = LlamaSpec.from_pretrained(tmp_path, dtype="float64")
    assert spec == LlamaSpec(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        dtype="float64",
    )
    legacy = hf_config(rope_parameters=None, rope_theta=1000.0, head_dim=16)
    assert LlamaSpec.from_hf_config(legacy).rope_theta == 1000.0
    assert LlamaSpec.from_hf_config(legacy).head_dim == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "not a multiple of num_kv_heads=3"),
    ],
)
def test_spec_rejects_what_it_cannot_run(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlamaSpec.from_hf_config(hf_config(**overrides))


def test_spec_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype='int8'"):
        LlamaSpec.from_hf_config(hf_config(), dtype="int8")


def test_from_pretrained_without_weights_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        TorchLlama.from_pretrained(tmp_path, device="cpu")


def test_load_weights_names_what_does_not_fit() -> None:
    state = {"model.embed_tokens.weight": torch.zeros(128, 32)}
    with pytest.raises(ValueError, match="Missing key"):
        TorchLlama(SPEC, "cpu").load_weights(state)


def test_random_weights_are_reproducible_from_the_seed(model: TorchLlama) -> None:
    tokens = [5, 9, 2, 77, 31]
    again = TorchLlama.random(SPEC, seed=1, device="cpu", init_std=0.3)
    other = TorchLlama.random(SPEC, seed=2, device="cpu", init_std=0.3)
    assert torch.equal(model.prompt_logits(tokens), again.prompt_logits(tokens))
    assert not torch.allclose(model.prompt_logits(tokens), other.prompt_logits(tokens))


# -- paged forward -------------------------------------------------------------------
def run_chunks(
    model: TorchLlama, tokens: list[int], chunks: list[int], blocks: list[int], bs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute `tokens` in consecutive chunks through one cache; returns the logits of
    each chunk's last token and the cache."""
    cache = model.allocate_kv_cache(max(blocks) + 1, bs)
    rows = []
    start = 0
    with torch.inference_mode():
        for n in chunks:
            entry = BatchEntry(tokens[start : start + n], start, blocks, True)
            rows.append(model(build_batch([entry], bs, CPU), cache)[0])
            start += n
    return torch.stack(rows), cache


def test_chunks_and_decodes_through_scattered_blocks_equal_one_prefill(
    model: TorchLlama,
) -> None:
    tokens = [(7 * i + 3) % 128 for i in range(23)]
    full = model.prompt_logits(tokens, block_size=4)
    chunks = [5, 1, 6, 3, 1, 1, 4, 1, 1]  # prefill chunks at offsets, decodes in between
    blocks = [11, 2, 7, 0, 5, 9]  # not in order: positions map through the table
    last, _ = run_chunks(model, tokens, chunks, blocks, bs=4)
    ends = torch.tensor(chunks).cumsum(0) - 1
    assert torch.allclose(last, full[ends], rtol=0, atol=1e-12)


def test_kv_lands_in_the_slot_of_its_position(model: TorchLlama) -> None:
    tokens = [(5 * i + 1) % 128 for i in range(10)]
    blocks = [3, 0, 6]
    _, cache = run_chunks(model, tokens, [4, 3, 3], blocks, bs=4)
    _, reference = run_chunks(model, tokens, [10], [0, 1, 2], bs=4)
    for pos in range(10):
        here = cache[blocks[pos // 4], :, :, pos % 4]
        there = reference[pos // 4, :, :, pos % 4]
        assert torch.allclose(here, there, rtol=0, atol=1e-12)
    assert cache.shape == (7, SPEC.num_layers, 2, 4, SPEC.num_kv_heads, SPEC.head_dim)
    assert not cache[[1, 2, 4, 5]].any()  # blocks the request does not own stay untouched


def test_a_mixed_batch_equals_its_entries_run_alone(model: TorchLlama) -> None:
    bs = 4
    prompts = [[(11 * i + j) % 128 for i in range(16 + j)] for j in range(4)]
    tables = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]]
    # Warm each request up to a different point, one at a time.
    done = [8, 12, 4, 0]
    cache = model.allocate_kv_cache(15, bs)
    with torch.inference_mode():
        for p, t, d in zip(prompts, tables, done, strict=True):
            if d:
                model(build_batch([BatchEntry(p[:d], 0, t, False)], bs, CPU), cache)
        alone_cache = cache.clone()
        # Two decodes, a continued prefill chunk, and a fresh chunk, in one pass.
        spans = [(8, 1), (12, 1), (4, 5), (0, 7)]
        entries = [
            BatchEntry(p[s : s + n], s, t, True)
            for p, t, (s, n) in zip(prompts, tables, spans, strict=True)
        ]
        together = model(build_batch(entries, bs, CPU), cache)
        alone = torch.cat([model(build_batch([e], bs, CPU), alone_cache) for e in entries])
    assert torch.allclose(together, alone, rtol=0, atol=1e-12)
    assert torch.allclose(cache, alone_cache, rtol=0, atol=1e-12)


def test_build_batch_rejects_an_entry_without_enough_blocks() -> None:
    with pytest.raises(ValueError, match=r"needs 3 blocks of 4, got 2"):
        build_batch([BatchEntry([1, 2, 3], 7, [0, 1], True)], 4, CPU)


# -- runner --------------------------------------------------------------------------
def test_runner_checks_the_cache_it_is_given(model: TorchLlama) -> None:
    good = model.allocate_kv_cache(8, 4)
    runner = TorchRunner(model, 4, kv_cache=good)
    assert runner.kv_cache is good and runner.num_blocks == 8
    with pytest.raises(ValueError, match="exactly one of num_blocks and kv_cache"):
        TorchRunner(model, 4)
    with pytest.raises(ValueError, match="exactly one of num_blocks and kv_cache"):
        TorchRunner(model, 4, num_blocks=8, kv_cache=good)
    with pytest.raises(ValueError, match=r"expected \[num_blocks"):
        TorchRunner(model, 8, kv_cache=good)
    with pytest.raises(ValueError, match=r"the model needs torch\.float64"):
        TorchRunner(model, 4, kv_cache=good.to(torch.float32))


def test_runner_from_config_sizes_its_cache_like_the_device_tier(model: TorchLlama) -> None:
    config = make_config(**{"kv.block_size": 8, "kv.device.num_blocks": 12})
    runner = TorchRunner.from_config(model, config)
    assert runner.block_size == 8
    assert runner.kv_cache.shape == model.kv_cache_shape(12, 8)
    assert runner.kv_cache.dtype == torch.float64 and not runner.kv_cache.any()


def plan_of(states: list[RequestState], spans: list[tuple[int, int]]) -> StepPlan:
    return StepPlan(
        step_id=1,
        now=0.0,
        requests=states,
        num_tokens=[n for _, n in spans],
        start_positions=[s for s, _ in spans],
        num_prefill_tokens=sum(n for _, n in spans if n > 1),
        num_decode_tokens=sum(1 for _, n in spans if n == 1),
        num_kv_tokens=sum(s + n for s, n in spans),
    )


def test_runner_samples_only_entries_that_reach_their_end(model: TorchLlama) -> None:
    runner = TorchRunner(model, 4, num_blocks=8)
    a = RequestState(Request("a", [1, 2, 3, 4, 5, 6], 4))
    b = RequestState(Request("b", [9, 8, 7], 4))
    a.block_ids, b.block_ids = [0, 1], [2]
    result = runner.execute(plan_of([a, b], [(0, 4), (0, 3)]))
    assert result.sampled_token_ids[0] is None
    expected = int(model.prompt_logits([9, 8, 7])[-1].argmax())
    assert result.sampled_token_ids[1] == expected
    assert result.duration_s > 0
    assert runner.execute(plan_of([], [])).sampled_token_ids == []


def test_a_request_aborted_after_the_plan_is_skipped(model: TorchLlama) -> None:
    scheduler = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 16})
    runner = TorchRunner(model, 4, num_blocks=16)
    keep = scheduler.add(make_request([1, 2, 3, 4, 5], max_new_tokens=2))
    gone = scheduler.add(make_request([6, 7, 8], max_new_tokens=2))
    plan = scheduler.plan(0.0)
    scheduler.abort(gone.request_id, 0.0)
    result = runner.execute(plan)
    assert result.sampled_token_ids[1] is None
    assert result.sampled_token_ids[0] == int(model.prompt_logits([1, 2, 3, 4, 5])[-1].argmax())
    scheduler.commit(plan, result, 0.1)
    assert keep.num_output_tokens == 1 and gone.finish_reason == "aborted"
    scheduler.check_integrity()


# -- sampling ------------------------------------------------------------------------
def test_filter_logits_keeps_top_k_then_the_nucleus() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0]).log()  # probs 0.1, 0.4, 0.3, 0.2, 0
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    assert torch.isfinite(kept).tolist() == [False, True, True, True, False]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(kept).tolist() == [False, True, True, False, False]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.71))
    assert torch.isfinite(kept).tolist() == [False, True, True, True, False]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.isfinite(kept).tolist() == [False, True, False, False, False]


def test_sample_seed_is_stable_and_distinct_per_draw() -> None:
    assert sample_seed(7, 0) == sample_seed(7, 0)
    seeds = {sample_seed(7, i) for i in range(100)} | {sample_seed(8, 0)}
    assert len(seeds) == 101
    assert all(0 <= s < 2**63 for s in seeds)


def sampling_state(rid: str, params: SamplingParams, num_outputs: int = 0) -> RequestState:
    state = RequestState(Request(rid, [1, 2], 8, sampling=params))
    state.token_ids.extend([3] * num_outputs)
    return state


def test_sampler_draws_per_request_not_per_batch() -> None:
    sampler = Sampler(CPU)
    logits = torch.zeros(4, 1000, dtype=torch.float64)
    states = [
        sampling_state(rid, SamplingParams(temperature=1.0, seed=s))
        for rid, s in (("x", 5), ("y", 6), ("z", 7), ("w", 5))
    ]
    together = sampler.sample(logits, states)
    alone = [sampler.sample(logits[:1], [s])[0] for s in states]
    assert together == alone
    assert len(set(together[:3])) == 3  # uniform over 1000 tokens: other seeds differ
    # The seed alone decides the draws, as in vLLM: the same seed in another request
    # (another request id: a server's are random) draws the same token.
    assert together[3] == together[0]
    later = sampler.sample(logits[:1], [sampling_state("x", states[0].request.sampling, 1)])
    assert later != together[:1]


def test_sampler_is_greedy_at_temperature_zero_and_with_top_k_one() -> None:
    sampler = Sampler(CPU)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    states = [
        sampling_state("g", SamplingParams()),
        sampling_state("k", SamplingParams(temperature=2.0, top_k=1, seed=1)),
        sampling_state("p", SamplingParams(temperature=2.0, top_p=1e-6)),
        sampling_state("q", SamplingParams(temperature=2.0, top_k=1)),
    ]
    assert sampler.sample(logits, states) == logits.argmax(-1).tolist()
