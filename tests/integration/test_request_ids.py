"""Request ids through the async engine: outputs go to the stream of the request that
produced them (by identity, not by id), and an id can be used again as soon as its
stream has ended, whether it ended on a stop token, by `abort`, `break` or
cancellation, with steps planned ahead or not."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.from_thread
import pytest

from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.base import ModelRunner
from kvflow.request import FinishReason, Request, RequestOutput, SamplingParams
from kvflow.scheduler import StepPlan, StepResult
from tests.builders import make_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": False})


def token_at(serial: int, index: int) -> int:
    """The token the runners below sample as output `index` of the request whose prompt
    starts with `serial`: distinct per request, so a stream can tell its own tokens."""
    return 10 + (serial * 31 + index * 17) % 900


class InstantRunner(ModelRunner):
    """Samples `token_at(prompt[0], n_outputs)` at once; no model, no sleeping."""

    supports_overlap = True

    def execute(self, plan: StepPlan) -> StepResult:
        return StepResult(
            [token_at(r.token_ids[0], r.num_output_tokens) for r in plan.requests], 0.0
        )


class HeldRunner(InstantRunner):
    """An `InstantRunner` whose steps wait, when `hold` is set, until the test lets
    them go: the test acts while a step is executing."""

    def __init__(self) -> None:
        self.hold = False
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def _wait(self) -> None:
        self.entered.set()
        await self.release.wait()

    def execute(self, plan: StepPlan) -> StepResult:
        if self.hold:
            anyio.from_thread.run(self._wait)
        return super().execute(plan)

    def let_go(self) -> None:
        self.hold = False
        self.release.set()


def request(rid: str, serial: int, max_new: int = 6, stop_at: int | None = None) -> Request:
    stops = () if stop_at is None else (token_at(serial, stop_at),)
    return Request(
        rid, (serial, 1, 2, 3, 4), max_new, sampling=SamplingParams(stop_token_ids=stops)
    )


def own_tokens(serial: int, n: int) -> list[int]:
    return [token_at(serial, i) for i in range(n)]


def make_engine(runner: ModelRunner, overlap: bool = True) -> AsyncEngine:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    return AsyncEngine(config, runner, "fcfs", overlap=overlap)


async def drain(eng: AsyncEngine, req: Request) -> list[RequestOutput]:
    return [out async for out in eng.generate(req)]


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_clean(eng: AsyncEngine) -> None:
    sched = eng.scheduler
    sched.check_integrity()
    assert not sched.has_unfinished
    assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [True, False])
async def test_an_id_reused_right_after_a_stop_token_gets_its_own_tokens(overlap: bool) -> None:
    # The first request stops on a stop token; with steps planned ahead it is still in
    # the next step's plan when its caller submits a new request under the same id.
    second: list[RequestOutput] = []
    with anyio.fail_after(20):
        async with make_engine(InstantRunner(), overlap) as eng:
            first = []
            async for out in eng.generate(request("a", 100, max_new=8, stop_at=2)):
                first.append(out)
                if out.finished:
                    second = await drain(eng, request("a", 200, max_new=5))
        assert_clean(eng)
    assert tokens_of(first) == own_tokens(100, 3)
    assert first[-1].finish_reason is FinishReason.STOP
    assert tokens_of(second) == own_tokens(200, 5)
    assert second[-1].finish_reason is FinishReason.LENGTH
    assert [o.finished for o in second] == [False] * 4 + [True]


@pytest.mark.parametrize("how", ["abort", "break", "cancel"])
async def test_an_id_is_free_at_once_after_its_stream_ends_during_a_step(how: str) -> None:
    runner = HeldRunner()
    with anyio.fail_after(20):
        async with make_engine(runner) as eng:
            try:
                await end_during_a_step(eng, runner, how)
                # The step still runs; the id is free all the same.
                stream = eng.submit(request("a", 200, max_new=4))
            finally:
                runner.let_go()
            outs = [o async for o in stream.receive]
        assert_clean(eng)
    assert tokens_of(outs) == own_tokens(200, 4)
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def end_during_a_step(eng: AsyncEngine, runner: HeldRunner, how: str) -> None:
    """Stream request "a" and end its stream by `how` while a step is executing."""
    gen = eng.generate(request("a", 100, max_new=50))
    with anyio.CancelScope() as scope:
        async with contextlib.aclosing(gen):
            async for out in gen:
                if out.num_output_tokens == 2 and not out.finished:
                    runner.hold = True
                    await runner.entered.wait()  # a step is executing now
                    if how == "abort":
                        assert eng.abort("a")
                    elif how == "break":
                        break
                    else:
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()
