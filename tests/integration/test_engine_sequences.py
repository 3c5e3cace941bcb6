"""Random sequences of add / cancel / abort / break / stop-token / EOS / id-reuse /
runner-failure events through the async engine, with steps planned ahead and not:
each stream gets exactly its own tokens and a proper end, an id is free as soon as
its stream has ended, the scheduler's invariants hold at every step, and no block is
referenced at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.engine import AsyncEngine, RequestFailedError, RequestIdInUseError
from kvflow.engine_adapters.base import ModelRunner
from kvflow.request import FinishReason, Request, RequestOutput, SamplingParams
from kvflow.scheduler import ModelInfo, StepPlan, StepResult
from tests.builders import make_config
from tests.integration.test_request_ids import token_at

EOS = 1
VOCAB = 100_000
IDS = ("a", "b", "c")  # few ids, so they are reused often
ENDED = (FinishReason.LENGTH, FinishReason.STOP)

Behaviour = Literal["full", "break", "cancel", "abort", "resubmit"]


@dataclass(frozen=True)
class Add:
    slot: int
    max_new: int
    stop_at: int | None
    eos_at: int | None
    ignore_eos: bool
    behaviour: Behaviour
    k: int
    """Outputs after which `break`, `cancel` and `abort` act."""
    bad: bool = False
    """A prompt token outside the vocabulary: rejected at once."""


@dataclass(frozen=True)
class Abort:
    slot: int


@dataclass(frozen=True)
class Yield:
    num_checkpoints: int


@dataclass(frozen=True)
class Fault:
    """The runner raises on its next step."""


Op = Add | Abort | Yield | Fault

adds = st.builds(
    Add,
    slot=st.integers(0, len(IDS) - 1),
    max_new=st.integers(1, 8),
    stop_at=st.none() | st.integers(0, 7),
    eos_at=st.none() | st.integers(0, 7),
    ignore_eos=st.booleans(),
    behaviour=st.sampled_from(["full", "break", "cancel", "abort", "resubmit"]),
    k=st.integers(1, 6),
)
ops = st.lists(
    st.one_of(
        adds,
        adds.map(lambda a: dataclasses.replace(a, bad=True)),
        st.builds(Abort, st.integers(0, len(IDS) - 1)),
        st.builds(Yield, st.integers(1, 40)),
        st.just(Fault()),
    ),
    max_size=30,
)


class ScriptRunner(ModelRunner):
    """Samples `token_at(serial, n)` (EOS where the request's script says) at once, and
    checks the scheduler's invariants at the start of every step, in the event loop."""

    supports_overlap = True
    model_info = ModelInfo(vocab_size=VOCAB, eos_token_ids=(EOS,))

    def __init__(self) -> None:
        self.eos_at: dict[int, int | None] = {}
        self.engine: AsyncEngine | None = None
        self.fail_next = False
        self.num_faults = 0
        self.num_steps = 0

    def _check(self) -> None:
        assert self.engine is not None
        self.engine.scheduler.check_integrity()

    def execute(self, plan: StepPlan) -> StepResult:
        anyio.from_thread.run_sync(self._check)
        self.num_steps += 1
        if self.fail_next:
            self.fail_next = False
            self.num_faults += 1
            raise RuntimeError(f"injected failure at step {self.num_steps}")
        tokens: list[int | None] = []
        for req in plan.requests:
            serial, n = req.token_ids[0], req.num_output_tokens
            tokens.append(EOS if self.eos_at.get(serial) == n else token_at(serial, n))
        return StepResult(tokens, 0.0)


@dataclass
class Record:
    """One submission and what its stream delivered."""

    request: Request
    spec: Add
    outs: list[RequestOutput] = field(default_factory=list)
    started: bool = False
    done: bool = False
    in_use: bool = False
    expected_free: bool = False
    """Every earlier stream of the id had ended when this one was submitted."""
    aborted: bool = False
    left: bool = False
    failed: RequestFailedError | None = None

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outs for t in o.new_token_ids]


def expected(serial: int, spec: Add) -> tuple[list[int], FinishReason]:
    stops = () if spec.stop_at is None else (token_at(serial, spec.stop_at),)
    out: list[int] = []
    for j in range(spec.max_new):
        token = EOS if spec.eos_at == j else token_at(serial, j)
        out.append(token)
        if j + 1 == spec.max_new:
            return out, FinishReason.LENGTH
        if (token == EOS and not spec.ignore_eos) or token in stops:
            return out, FinishReason.STOP
    raise AssertionError("max_new >= 1")


async def drive(script: list[Op], overlap: bool, num_blocks: int) -> None:
    runner = ScriptRunner()
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": num_blocks})
    eng = AsyncEngine(config, runner, "fcfs", overlap=overlap)
    runner.engine = eng
    serials = itertools.count(1000)
    records: list[Record] = []

    def new_record(spec: Add) -> Record:
        serial = next(serials)
        runner.eos_at[serial] = spec.eos_at
        stops = [] if spec.stop_at is None else [token_at(serial, spec.stop_at)]
        prompt = (serial, VOCAB + 5 if spec.bad else 2, 3, 4, 5)
        sampling = SamplingParams(stop_token_ids=stops, ignore_eos=spec.ignore_eos)
        rec = Record(Request(IDS[spec.slot], prompt, spec.max_new, sampling=sampling), spec)
        records.append(rec)
        return rec

    def live(rid: str) -> Record | None:
        started = [r for r in records if r.request.request_id == rid and r.started]
        ok = [r for r in started if not r.in_use and not r.done]
        return ok[-1] if ok else None

    async def consume(rec: Record) -> None:
        spec, rid = rec.spec, rec.request.request_id
        follow_up: Record | None = None
        rec.expected_free = all(
            r.done for r in records if r.request.request_id == rid and r.started
        )
        rec.started = True
        try:
            with anyio.CancelScope() as scope:
                gen = eng.generate(rec.request)
                async with contextlib.aclosing(gen):
                    async for out in gen:
                        rec.outs.append(out)
                        if out.finished:
                            if spec.behaviour == "resubmit" and out.finish_reason in ENDED:
                                follow_up = new_record(dataclasses.replace(spec, behaviour="full"))
                            break
                        if out.num_output_tokens >= spec.k and spec.behaviour == "break":
                            rec.left = True
                            break
                        if out.num_output_tokens >= spec.k and spec.behaviour == "cancel":
                            rec.left = True
                            scope.cancel()
                            await anyio.lowlevel.checkpoint()
                        if out.num_output_tokens >= spec.k and spec.behaviour == "abort":
                            rec.aborted = rec.aborted or eng.abort(rid)
        except RequestIdInUseError:
            rec.in_use = True
        except RequestFailedError as err:
            rec.failed = err
        finally:
            rec.done = True
        if follow_up is not None:  # at once, in the same turn as the final output
            await consume(follow_up)

    with anyio.fail_after(30):
        async with eng, anyio.create_task_group() as tg:
            for op in script:
                if isinstance(op, Add):
                    tg.start_soon(consume, new_record(op))
                elif isinstance(op, Abort):
                    rid = IDS[op.slot]
                    target = live(rid)
                    if eng.abort(rid):
                        assert target is not None, f"abort({rid!r}) found a stream nobody runs"
                        target.aborted = True
                elif isinstance(op, Fault):
                    runner.fail_next = True
                else:
                    for _ in range(op.num_checkpoints):
                        await anyio.lowlevel.checkpoint()
            runner.fail_next = False
        sched = eng.scheduler
        sched.check_integrity()
        assert not sched.has_unfinished and eng.statistics().num_running == 0
        assert sched.num_leaked_blocks() == 0 and sched.pool.num_used_blocks == 0

    for rec in records:
        check_record(rec, runner)


def check_record(rec: Record, runner: ScriptRunner) -> None:
    rid = rec.request.request_id
    if rec.in_use:
        assert not rec.expected_free, f"{rid!r} was refused though its streams had ended"
        return
    assert rec.done, f"{rid!r}'s consumer never ended"
    want, reason = expected(rec.request.prompt_token_ids[0], rec.spec)
    got = rec.tokens
    assert got == want[: len(got)], f"{rid!r} got tokens not its own: {got} vs {want}"
    counts = list(itertools.accumulate(len(o.new_token_ids) for o in rec.outs))
    assert [o.num_output_tokens for o in rec.outs] == counts
    assert not any(o.finished for o in rec.outs[:-1])
    if rec.failed is not None:
        assert runner.num_faults > 0 and isinstance(rec.failed.__cause__, RuntimeError)
        return
    if rec.left and not (rec.outs and rec.outs[-1].finished):
        return
    assert rec.outs and rec.outs[-1].finished, f"{rid!r}'s stream ended without a final output"
    last = rec.outs[-1]
    if rec.spec.bad:
        assert last.finish_reason is FinishReason.REJECTED and not got
    elif last.finish_reason is FinishReason.ABORTED:
        assert rec.aborted, f"{rid!r} ended as aborted, but nobody aborted it"
    else:
        assert (got, last.finish_reason) == (want, reason)


# 5 blocks of 4 tokens: two requests of up to 13 tokens (4 blocks each) preempt each other.
num_blocks = st.sampled_from([5, 128])


@pytest.mark.parametrize("overlap", [True, False])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops, num_blocks=num_blocks)
def test_random_event_sequences_keep_every_stream_its_own(
    overlap: bool, script: list[Op], num_blocks: int
) -> None:
    anyio.run(drive, script, overlap, num_blocks)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops, num_blocks=num_blocks)
def test_random_event_sequences_soak(overlap: bool, script: list[Op], num_blocks: int) -> None:
    anyio.run(drive, script, overlap, num_blocks)
