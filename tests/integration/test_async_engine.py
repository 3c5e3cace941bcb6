"""The async engine: streaming, cancellation, back-pressure and shutdown, on asyncio and
on asyncio with uvloop."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from kvflow.engine import (
    AsyncEngine,
    EngineClosedError,
    EngineOverloadedError,
    RequestFailedError,
)
from kvflow.engine_adapters.simulated import LatencyModel, SimulatedRunner
from kvflow.policies.base import SchedulerView
from kvflow.policies.edf import EDFPolicy
from kvflow.policies.fcfs import FCFSPolicy
from kvflow.request import FinishReason, RequestOutput, RequestState
from kvflow.scheduler import StepPlan, StepResult
from tests.builders import make_config, make_request

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class PacedRunner(SimulatedRunner):
    """The simulated runner, taking real time per step like a model would."""

    def __init__(self, step_s: float = 0.002) -> None:
        super().__init__(LatencyModel(0.0, 0.0, 0.0, 0.0), filler_token_id=3)
        self.step_s = step_s

    def execute(self, plan: StepPlan) -> StepResult:
        time.sleep(self.step_s)
        return super().execute(plan)


def engine(**kw: Any) -> AsyncEngine:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 256})
    return AsyncEngine(config, PacedRunner(), "fcfs", **kw)


async def collect(eng: AsyncEngine, prompt: int, max_new: int, base: int) -> list[RequestOutput]:
    return [out async for out in eng.generate(make_request(prompt, max_new, base=base))]


async def test_tokens_stream_step_by_step_and_end_with_a_reason() -> None:
    with anyio.fail_after(30):
        async with engine() as eng:
            outs = await collect(eng, 12, 8, base=100)
            stats = eng.statistics()
    assert [len(o.new_token_ids) for o in outs] == [1] * 8  # one token per step
    assert [o.num_output_tokens for o in outs] == list(range(1, 9))
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    assert not any(o.finished for o in outs[:-1])
    assert outs[-1].ttft_s is not None and outs[-1].e2e_s is not None
    assert 0 < outs[-1].ttft_s <= outs[-1].e2e_s
    assert stats.num_finished == 1 and stats.num_running == 0
    assert eng.num_overlapped_steps > 0  # the paced runner lets steps be planned ahead


async def test_coalesce_joins_the_outputs_a_slow_consumer_missed() -> None:
    with anyio.fail_after(30):
        async with engine() as eng:
            outputs: list[RequestOutput] = []
            request = make_request(8, 40, base=10)
            async for out in eng.generate(request, coalesce=True):
                outputs.append(out)
                await anyio.sleep(0.02)  # ~10 steps of 2 ms pass meanwhile
    assert 1 < len(outputs) < 40  # several steps' tokens per output
    assert sum(len(o.new_token_ids) for o in outputs) == 40
    counts = [o.num_output_tokens for o in outputs]
    assert counts == list(itertools.accumulate(len(o.new_token_ids) for o in outputs))
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.LENGTH
    assert not any(o.finished for o in outputs[:-1])


async def test_cancelling_half_of_100_streams_leaks_no_block() -> None:
    finished: list[RequestOutput] = []
    cancelled = 0

    async def consume(eng: AsyncEngine, i: int, cancel: bool) -> None:
        nonlocal cancelled
        with anyio.CancelScope() as scope:
            async for out in eng.generate(make_request(20, 30, base=1000 * i)):
                if cancel and out.num_output_tokens >= 3:
                    scope.cancel()
                if out.finished:
                    finished.append(out)
        if scope.cancelled_caught:
            cancelled += 1

    with anyio.fail_after(60):
        async with engine() as eng:
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(consume, eng, i, i % 2 == 0)
            sched = eng.scheduler
            assert not sched.has_unfinished
            assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0
            sched.check_integrity()
            assert sched.stats.num_aborted == 50
    assert cancelled == 50
    assert len(finished) == 50 and all(o.finish_reason is FinishReason.LENGTH for o in finished)


async def test_back_pressure_rejects_beyond_the_limit_at_once() -> None:
    with anyio.fail_after(30):
        async with engine(max_num_pending=4) as eng:
            streams = [eng.submit(make_request(8, 50, base=10 * i)) for i in range(4)]
            with pytest.raises(EngineOverloadedError, match="4 requests in flight"):
                eng.submit(make_request(8, 5, base=999))
            for s in streams:
                async for _ in s.receive:
                    pass
            # Room again once they are done.
            outs = await collect(eng, 8, 2, base=5000)
            assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_aclose_drains_or_aborts_in_flight_requests() -> None:
    with anyio.fail_after(30):
        eng = engine(on_close="drain")
        async with eng:
            stream = eng.submit(make_request(8, 20, base=1))
        outs = [o async for o in stream.receive]
        assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].num_output_tokens == 20
        with pytest.raises(EngineClosedError):
            eng.submit(make_request(8, 2, base=2))

        eng = engine(on_close="abort")
        async with eng:
            stream = eng.submit(make_request(8, 500, base=3))
            await anyio.sleep(0.02)
        outs = [o async for o in stream.receive]
        assert outs[-1].finish_reason is FinishReason.ABORTED
        assert outs[-1].num_output_tokens < 500
        assert eng.scheduler.pool.num_used_blocks == 0


async def test_bad_engine_arguments_and_an_unknown_abort_are_named() -> None:
    for kw, message in (
        ({"on_close": "abrot"}, "on_close must be 'drain' or 'abort', got 'abrot'"),
        ({"max_num_pending": 0}, "max_num_pending must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError) as err:
            engine(**kw)
        assert str(err.value) == message
    async with engine() as eng:
        assert eng.abort("no-such-request") is False  # as vLLM's abort: nothing to do


async def test_a_request_that_cannot_fit_is_rejected_with_a_reason() -> None:
    with anyio.fail_after(30):
        async with engine() as eng:
            outs = await collect(eng, 2000, 10, base=0)
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].finish_reason is FinishReason.REJECTED and "blocks" in outs[0].finish_detail


class BrokenPolicy(FCFSPolicy):
    """Orders the queue once, then raises: a bug in a plugin policy."""

    def __init__(self) -> None:
        self.num_calls = 0

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> list[RequestState]:
        self.num_calls += 1
        if self.num_calls > 1:
            raise RuntimeError("policy bug")
        return list(waiting)


async def test_a_bug_in_planning_reaches_every_caller_as_itself_not_as_a_cancellation() -> None:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 256})
    with anyio.fail_after(30):
        async with AsyncEngine(config, PacedRunner(), BrokenPolicy()) as eng:
            first = eng.generate(make_request(8, 50, base=1))
            assert (await first.__anext__()).num_output_tokens == 1
            with pytest.raises(RequestFailedError, match="policy bug") as err:
                await collect(eng, 8, 5, base=100)  # its admission calls the policy again
            assert isinstance(err.value.__cause__, RuntimeError)
            with pytest.raises(RequestFailedError, match="policy bug"):
                async for _ in first:
                    pass
            with pytest.raises(EngineClosedError, match="policy bug"):
                eng.submit(make_request(8, 5, base=200))


async def test_a_request_the_policy_drops_ends_its_stream_as_rejected() -> None:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 256})
    policy = EDFPolicy(hopeless="reject", prefill_token_s=1.0)  # 32 tokens: 32 s > 5 ms
    with anyio.fail_after(30):
        async with AsyncEngine(config, PacedRunner(), policy) as eng:
            outs = [o async for o in eng.generate(make_request(32, 4, base=1, ttft_ms=5))]
            kept = await collect(eng, 8, 3, base=100)
    assert len(outs) == 1 and outs[0].finish_reason is FinishReason.REJECTED
    assert outs[0].finish_detail
    assert kept[-1].finish_reason is FinishReason.LENGTH
