"""Bad requests fail as themselves: at `LLM.generate` a `ValueError` that names the
field and quotes the value, at `AsyncEngine.generate` a finished `rejected` output with
the reason; a runner that raises fails the requests of its step with that error and
leaves the engine serving the others, with no block leaked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kvflow  # noqa: E402
from kvflow.engine import AsyncEngine, RequestFailedError  # noqa: E402
from kvflow.engine_adapters.base import ModelRunner  # noqa: E402
from kvflow.engine_adapters.factory import build_runner, load_model  # noqa: E402
from kvflow.engine_adapters.hf import save_random_hf_llama  # noqa: E402
from kvflow.request import FinishReason, Request, RequestOutput  # noqa: E402
from kvflow.scheduler import StepPlan, StepResult  # noqa: E402
from tests.integration.test_exactness import SPEC  # noqa: E402

pytestmark = pytest.mark.anyio

SETTINGS = {"kv.block_size": 4, "kv.device.num_blocks": 256}


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": False})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad-requests-model")
    save_random_hf_llama(SPEC, path, seed=3, init_std=0.2)
    return path


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Any:
    with kvflow.LLM(model_dir, settings=SETTINGS) as llm:
        yield llm


TOO_LONG = SPEC.max_position_embeddings  # prompt + 1 new token > the model's positions


@pytest.mark.parametrize(
    ("prompts", "max_new", "names"),
    [
        ([[1, 2, 3], [4, 256, 6]], 4, ["prompt_token_ids[1][1]", "256", "vocab"]),
        ([[1, 2, 3], [4, -1, 6]], 4, ["prompt_token_ids[1][1]", "-1"]),
        ([[1, 2.5, 3]], 4, ["prompt_token_ids[0][1]", "2.5"]),
        ([[1, "7", 3]], 4, ["prompt_token_ids[0][1]", "'7'"]),
        ([[1, 2, 3], []], 4, ["prompt_token_ids[1]", "empty"]),
        ([[1, 2, 3]], 0, ["max_new_tokens", "0"]),
        ([[1] * TOO_LONG], 1, ["prompt_token_ids[0]", "max_position_embeddings", "512"]),
    ],
)
def test_llm_generate_names_the_bad_field_and_value(
    llm: Any, prompts: list[list[object]], max_new: int, names: list[str]
) -> None:
    with pytest.raises(ValueError) as err:
        llm.generate(prompts, max_new_tokens=max_new)
    for name in names:
        assert name in str(err.value)


def test_llm_generate_rejects_a_prompt_over_max_model_len(model_dir: Path) -> None:
    settings = {**SETTINGS, "scheduler.max_model_len": 64}
    with kvflow.LLM(model_dir, settings=settings) as llm:
        with pytest.raises(ValueError, match=r"prompt_token_ids\[0\].*max_model_len \(64\)"):
            llm.generate([[3] * 60], max_new_tokens=8)
        assert len(llm.generate([[3] * 60], max_new_tokens=4)[0]) == 4


async def serve(model_dir: Path, requests: list[Request]) -> tuple[list[list[RequestOutput]], Any]:
    built = build_runner(load_model(model_dir, "torch"), SETTINGS)
    results: list[list[RequestOutput]] = [[] for _ in requests]

    async def consume(i: int, req: Request, eng: AsyncEngine) -> None:
        async for out in eng.generate(req):
            results[i].append(out)

    try:
        with anyio.fail_after(60):
            eng = AsyncEngine(built.config, built.runner, "fcfs", built.store)
            async with eng, anyio.create_task_group() as tg:
                for i, req in enumerate(requests):
                    tg.start_soon(consume, i, req, eng)
    finally:
        built.store.close()
    return results, eng


async def test_async_engine_rejects_bad_requests_and_serves_the_others(model_dir: Path) -> None:
    requests = [
        Request("good-1", (1, 2, 3, 4), 6),
        Request("vocab", (1, 300, 3), 6),
        Request("positions", (1,) * 500, 20),
        Request("good-2", (5, 6, 7), 6),
    ]
    results, eng = await serve(model_dir, requests)
    by_id = {r.request_id: outs for r, outs in zip(requests, results, strict=True)}
    for rid in ("good-1", "good-2"):
        assert by_id[rid][-1].finish_reason is FinishReason.LENGTH
        assert by_id[rid][-1].num_output_tokens == 6
    for rid, words in (("vocab", ["300", "vocab"]), ("positions", ["max_position_embeddings"])):
        (out,) = by_id[rid]
        assert out.finished and out.finish_reason is FinishReason.REJECTED
        assert all(w in out.finish_detail for w in words), out.finish_detail
    eng.scheduler.check_integrity()
    assert eng.scheduler.num_leaked_blocks() == 0 and eng.scheduler.pool.num_used_blocks == 0


class FailingRunner(ModelRunner):
    """A real runner whose `execute` raises on the steps in `fail_steps` (all steps when
    None), as a runner out of memory or with a broken kernel would."""

    supports_overlap = True

    def __init__(self, inner: ModelRunner, fail_steps: set[int] | None = None) -> None:
        self.inner = inner
        self.model_info = inner.model_info
        self.fail_steps = fail_steps
        self.num_steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.num_steps += 1
        if self.fail_steps is None or self.num_steps in self.fail_steps:
            raise RuntimeError(f"device lost at step {self.num_steps}")
        return self.inner.execute(plan)


async def run_one(eng: AsyncEngine, req: Request) -> list[RequestOutput] | RequestFailedError:
    try:
        return [out async for out in eng.generate(req)]
    except RequestFailedError as err:
        return err


async def test_a_runner_error_fails_its_steps_requests_and_the_engine_serves_on(
    model_dir: Path,
) -> None:
    built = build_runner(load_model(model_dir, "torch"), SETTINGS)
    runner = FailingRunner(built.runner, fail_steps={3})
    try:
        with anyio.fail_after(60):
            async with AsyncEngine(built.config, runner, "fcfs", built.store) as eng:
                results: dict[str, Any] = {}

                async def one(req: Request) -> None:
                    results[req.request_id] = await run_one(eng, req)

                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(one, Request(f"early-{i}", (1 + i, 2, 3, 4, 5), 6))
                late = await run_one(eng, Request("late", (9, 8, 7), 5))
                sched = eng.scheduler
                sched.check_integrity()
                assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0
    finally:
        built.store.close()
    for i in range(3):
        err = results[f"early-{i}"]
        assert isinstance(err, RequestFailedError) and err.request_id == f"early-{i}"
        assert isinstance(err.__cause__, RuntimeError)
        assert "device lost at step 3" in str(err)
    assert not isinstance(late, RequestFailedError)
    assert late[-1].finish_reason is FinishReason.LENGTH and late[-1].num_output_tokens == 5


async def test_a_runner_that_always_raises_fails_every_request_and_closes_cleanly(
    model_dir: Path,
) -> None:
    built = build_runner(load_model(model_dir, "torch"), SETTINGS)
    try:
        with anyio.fail_after(60):
            async with AsyncEngine(
                built.config, FailingRunner(built.runner), "fcfs", built.store
            ) as eng:
                outcomes = [await run_one(eng, Request(f"r{i}", (1, 2, 3), 4)) for i in range(3)]
    finally:
        built.store.close()
    assert all(isinstance(o, RequestFailedError) for o in outcomes)
    sched = eng.scheduler
    sched.check_integrity()
    assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0


def test_llm_generate_raises_the_runners_error(model_dir: Path) -> None:
    with kvflow.LLM(model_dir, settings=SETTINGS) as llm:
        llm.runner = FailingRunner(llm.runner)
        with pytest.raises(RequestFailedError, match="device lost") as err:
            llm.generate([[1, 2, 3], [4, 5]], max_new_tokens=3)
        assert isinstance(err.value.__cause__, RuntimeError)
