"""Log-probabilities from the torch runner through the scheduler's commit to
`RequestOutput`: raw (before temperature and filtering), only for the requests that ask,
one per output token; runners without them refuse such requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

torch = pytest.importorskip("torch")

from kvflow.engine import AsyncEngine  # noqa: E402
from kvflow.engine_adapters.simulated import LatencyModel, SimulatedRunner  # noqa: E402
from kvflow.engine_adapters.torch import LlamaSpec, Sampler, TorchLlama, TorchRunner  # noqa: E402
from kvflow.request import Request, RequestOutput, RequestState, SamplingParams  # noqa: E402
from tests.builders import make_config, make_request, make_scheduler  # noqa: E402

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


def state(rid: str, params: SamplingParams) -> RequestState:
    return RequestState(Request(rid, [1, 2], 8, sampling=params))


def test_sampler_logprobs_are_raw_and_only_for_requests_that_ask() -> None:
    sampler = Sampler(CPU)
    logits = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = [
        state("a", SamplingParams(temperature=3.0, top_k=2, seed=1, logprobs=4)),
        state("b", SamplingParams()),
        state("c", SamplingParams(logprobs=0)),
    ]
    tokens = sampler.sample(logits, states)
    out = sampler.logprobs(logits, states, tokens)
    assert out is not None and out[1] is None
    raw = torch.log_softmax(logits, -1)
    a, c = out[0], out[2]
    assert a is not None and c is not None
    # Of the model's distribution, not of the one temperature and top-k sampled from.
    assert a.logprob == pytest.approx(float(raw[0, tokens[0]]), abs=1e-12)
    values, ids = torch.topk(raw[0], 4)
    assert [t for t, _ in a.top] == ids.tolist()
    assert [v for _, v in a.top] == pytest.approx(values.tolist(), abs=1e-12)
    assert c.top == () and c.logprob == pytest.approx(float(raw[2].max()), abs=1e-12)
    assert sampler.logprobs(logits[1:2], states[1:2], tokens[1:2]) is None


def test_runner_and_commit_keep_one_logprob_per_output_token() -> None:
    model = TorchLlama.random(SPEC, seed=1, device="cpu", init_std=0.3)
    scheduler = make_scheduler(**{"kv.block_size": 4, "kv.device.num_blocks": 32})
    runner = TorchRunner(model, 4, num_blocks=32)
    asks = scheduler.add(make_request([5, 6, 7, 8, 9], 5, sampling=SamplingParams(logprobs=2)))
    plain = scheduler.add(make_request([1, 2, 3], 5))
    for step in range(20):  # bounded: 5 outputs take 5 steps
        if not scheduler.has_unfinished:
            break
        plan = scheduler.plan(float(step))
        result = runner.execute(plan)
        scheduler.commit(plan, result, float(step) + 0.5)
    assert asks.is_finished and plain.is_finished and plain.logprobs is None
    assert asks.logprobs is not None and len(asks.logprobs) == asks.num_output_tokens == 5
    tokens = list(asks.token_ids)
    raw = torch.log_softmax(model.prompt_logits(tokens[:-1]), -1)
    for i, lp in enumerate(asks.logprobs):
        position = asks.num_prompt_tokens - 1 + i
        assert lp.logprob == pytest.approx(float(raw[position, tokens[position + 1]]), abs=1e-9)
        assert lp.top[0][0] == tokens[position + 1]  # greedy: the most likely
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
    out = RequestOutput.of(asks, tokens[-2:])
    assert out.logprobs == tuple(asks.logprobs[-2:])
    assert RequestOutput.of(plain, []).logprobs is None


def test_llm_generate_returns_one_logprob_per_token_when_asked(tmp_path: Path) -> None:
    import kvflow
    from tests.text_model import build_text_model

    build_text_model(tmp_path)
    model = TorchLlama.from_pretrained(tmp_path, dtype="float64")
    settings = {"kv.block_size": 4, "kv.device.num_blocks": 32}
    with kvflow.LLM(tmp_path, engine="torch", dtype="float64", settings=settings) as llm:
        [asked, plain] = [
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=n))[0]
            for n in (1, None)
        ]
    assert plain.logprobs is None
    assert asked.logprobs is not None and len(asked.logprobs) == 4
    raw = torch.log_softmax(model.prompt_logits([5, 6, 7, *asked.token_ids[:-1]]), -1)
    for i, (lp, token) in enumerate(zip(asked.logprobs, asked.token_ids, strict=True)):
        assert lp.logprob == pytest.approx(float(raw[2 + i, token]), abs=1e-9)
        assert lp.top[0][0] == token


@pytest.fixture
def anyio_backend() -> Any:
    return "asyncio"


@pytest.mark.anyio
async def test_a_runner_without_logprobs_refuses_requests_that_ask() -> None:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    runner = SimulatedRunner(LatencyModel(0.0, 0.0, 0.0, 0.0), filler_token_id=3)
    with anyio.fail_after(10):
        async with AsyncEngine(config, runner) as engine:
            request = make_request(8, 2, sampling=SamplingParams(logprobs=1))
            with pytest.raises(ValueError, match=r"logprobs=1, but runner 'sim'"):
                async for _ in engine.generate(request):
                    pass
            outputs = [out async for out in engine.generate(make_request(8, 2))]
            assert outputs[-1].finished and outputs[-1].logprobs is None
