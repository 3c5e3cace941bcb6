"""The correctness anchor: tokens through kvflow equal the model's tokens run alone.

A tiny random Llama is built and saved with transformers (no download), and loaded into
both sides in float64. The scheduler runs its real plan/commit loop with chunked
prefill, prefix hits and preemption; its greedy tokens must equal transformers' own
`generate`, one prompt at a time, token for token.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvflow.engine_adapters.base import ModelRunner  # noqa: E402
from kvflow.engine_adapters.hf import HFRunner, save_random_hf_llama  # noqa: E402
from kvflow.engine_adapters.torch import LlamaSpec, TorchLlama, TorchRunner  # noqa: E402
from kvflow.request import Request, RequestState, SamplingParams  # noqa: E402
from kvflow.scheduler import Scheduler, SchedulerStats  # noqa: E402
from kvflow.traces.replay import make_policy  # noqa: E402
from tests.builders import make_config  # noqa: E402

SPEC = LlamaSpec(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=500000.0,
    max_position_embeddings=512,
    dtype="float64",
)

# Small enough that requests preempt each other, chunk their prompts and hit cached prefixes.
PRESSURE = {
    "kv.block_size": 4,
    "kv.device.num_blocks": 20,
    "scheduler.long_prefill_threshold": 5,
    "scheduler.max_num_batched_tokens": 24,
    "scheduler.max_num_seqs": 6,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A saved random Llama (weights large enough that outputs depend on context)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = save_random_hf_llama(SPEC, path, seed=3, init_std=0.2)
    return path, model


@pytest.fixture(scope="module")
def greedy_reference(checkpoint: tuple[Path, Any]) -> dict[str, list[int]]:
    """transformers' greedy outputs for `make_requests()` (computed once)."""
    return reference_outputs(checkpoint[1], make_requests())


def make_requests(
    n: int = 14, seed: int = 0, sampling: SamplingParams | None = None
) -> list[Request]:
    """Prompts built from three shared system prefixes plus private suffixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(SPEC.vocab_size) for _ in range(k)] for k in (11, 17, 6)]
    requests = []
    for i in range(n):
        suffix = [rng.randrange(SPEC.vocab_size) for _ in range(rng.randint(1, 9))]
        requests.append(
            Request(
                f"p{i}",
                prefixes[i % 3] + suffix,
                max_new_tokens=rng.randint(3, 10),
                arrival_time=0.001 * i,
                sampling=sampling or SamplingParams(),
            )
        )
    return requests


def reference_outputs(model: Any, requests: Sequence[Request]) -> dict[str, list[int]]:
    """transformers' greedy `generate`, one prompt at a time."""
    outputs = {}
    for req in requests:
        prompt = torch.tensor([req.prompt_token_ids])
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=req.max_new_tokens,
            do_sample=False,
        )
        outputs[req.request_id] = generated[0, prompt.shape[1] :].tolist()
    return outputs


def run_kvflow(
    runner: ModelRunner, requests: Sequence[Request], **settings: Any
) -> tuple[list[RequestState], SchedulerStats]:
    """The plain synchronous loop: plan, execute, commit until every request is done."""
    policy = settings.pop("policy", "fcfs")
    config = make_config(**settings)
    scheduler = Scheduler(config, make_policy(policy, config))
    states = [scheduler.add(r) for r in requests]
    now = 0.0
    for _ in range(10_000):
        if not scheduler.has_unfinished:
            break
        plan = scheduler.plan(now)
        result = runner.execute(plan)
        now += 0.01
        scheduler.commit(plan, result, now)
        scheduler.check_integrity()
    assert not scheduler.has_unfinished
    assert scheduler.num_leaked_blocks() == 0
    return states, scheduler.stats


def test_torch_llama_logits_equal_transformers(checkpoint: tuple[Path, Any]) -> None:
    path, hf_model = checkpoint
    model = TorchLlama.from_pretrained(path, dtype="float64", device="cpu")
    assert model.spec == SPEC
    tokens = list(make_requests(1)[0].prompt_token_ids) * 3
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0]
    logits = model.prompt_logits(tokens, block_size=4)
    assert logits.shape == (len(tokens), SPEC.vocab_size)
    assert torch.allclose(logits, expected, rtol=0, atol=1e-9)


def test_tied_embeddings_load_without_an_lm_head(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, tie_word_embeddings=True)
    hf_model = save_random_hf_llama(spec, tmp_path, seed=4, init_std=0.2)
    model = TorchLlama.from_pretrained(tmp_path, dtype="float64", device="cpu")
    assert model.spec == spec
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = list(range(40, 90))
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0]
    assert torch.allclose(model.prompt_logits(tokens, 8), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("policy", "block_size", "chunk"),
    [("fcfs", 4, 5), ("lpm", 2, 3)],
)
def test_torch_runner_greedy_tokens_equal_generate(
    checkpoint: tuple[Path, Any],
    greedy_reference: dict[str, list[int]],
    policy: str,
    block_size: int,
    chunk: int,
) -> None:
    requests = make_requests()
    expected = greedy_reference
    settings = {
        **PRESSURE,
        "kv.block_size": block_size,
        "kv.device.num_blocks": 80 // block_size,
        "scheduler.long_prefill_threshold": chunk,
        "policy": policy,
    }
    model = TorchLlama.from_pretrained(checkpoint[0], dtype="float64", device="cpu")
    runner = TorchRunner(model, block_size, num_blocks=80 // block_size)
    states, stats = run_kvflow(runner, requests, **settings)
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens > 0
    assert len({tuple(v) for v in expected.values()}) > len(requests) // 2  # outputs vary
    assert {s.request_id: s.output_token_ids for s in states} == expected


def test_stop_tokens_cut_outputs_where_generate_would(checkpoint: tuple[Path, Any]) -> None:
    path, hf_model = checkpoint
    plain = make_requests(6, seed=5)
    expected = reference_outputs(hf_model, plain)
    requests = []
    for req in plain:
        stop = expected[req.request_id][1]
        requests.append(
            Request(
                req.request_id,
                req.prompt_token_ids,
                req.max_new_tokens,
                sampling=SamplingParams(stop_token_ids=(stop,)),
            )
        )
    runner = TorchRunner(TorchLlama.from_pretrained(path, "float64", "cpu"), 4, num_blocks=20)
    states, _ = run_kvflow(runner, requests, **PRESSURE)
    for state in states:
        ref = expected[state.request_id]
        assert state.output_token_ids == ref[: ref.index(ref[1]) + 1]
        assert state.finish_reason == "stop"


def test_hf_runner_greedy_tokens_equal_generate(
    checkpoint: tuple[Path, Any], greedy_reference: dict[str, list[int]]
) -> None:
    requests = make_requests()
    expected = greedy_reference
    runner = HFRunner(checkpoint[1], 4, num_blocks=20)
    states, stats = run_kvflow(runner, requests, **PRESSURE)
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens > 0
    assert {s.request_id: s.output_token_ids for s in states} == expected
    # Both runners leave the same KV in the same layout: blocks move between them alike.
    torch_runner = TorchRunner(TorchLlama.from_pretrained(checkpoint[0], "float64", "cpu"), 4, 20)
    run_kvflow(torch_runner, requests, **PRESSURE)
    assert runner.kv_cache.shape == torch_runner.kv_cache.shape
    assert torch.allclose(runner.kv_cache, torch_runner.kv_cache, rtol=0, atol=1e-12)


def test_seeded_sampling_is_the_same_in_any_batching(
    checkpoint: tuple[Path, Any], greedy_reference: dict[str, list[int]]
) -> None:
    path, hf_model = checkpoint
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    requests = make_requests(8, sampling=sampling)
    model = TorchLlama.from_pretrained(path, dtype="float64", device="cpu")

    def outputs(runner: ModelRunner, reqs: Sequence[Request], **settings: Any) -> list[list[int]]:
        states, _ = run_kvflow(runner, reqs, **settings)
        return [s.output_token_ids for s in states]

    alone = {"kv.block_size": 4, "kv.device.num_blocks": 64, "scheduler.max_num_seqs": 1}
    one_at_a_time = outputs(TorchRunner(model, 4, num_blocks=64), requests, **alone)
    crowded = outputs(TorchRunner(model, 4, num_blocks=20), requests, **PRESSURE)
    through_hf = outputs(HFRunner(hf_model, 4, num_blocks=20), requests, **PRESSURE)
    assert crowded == one_at_a_time
    assert through_hf == one_at_a_time

    greedy = [greedy_reference[r.request_id] for r in requests]
    assert one_at_a_time != greedy
    reseeded = [
        Request(
            r.request_id,
            r.prompt_token_ids,
            r.max_new_tokens,
            sampling=SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=12),
        )
        for r in requests
    ]
    assert outputs(TorchRunner(model, 4, num_blocks=20), reseeded, **PRESSURE) != one_at_a_time
