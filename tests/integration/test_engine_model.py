"""Model-based test of `AsyncEngine` over a store with real tensors and real threaded
copies: random scripts of clients that consume their streams whole, `break` out of
them, close them, are cancelled, or are aborted from outside, reusing a few request
ids, with overlap on and off and tiny tiers (preemption, swaps, loads from cpu and
disk).

Every output carries exactly the tokens its prompt determines (`tests.kv_shadow`: the
runner checks each step's KV reads against the request's own tokens, and that no copy's
block is touched while the copy runs); an id is free again as `RequestIdInUseError`
documents; at the end every stream finished, aborted or rejected, and no block is
referenced in any tier.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine, RequestIdInUseError
from kvflow.kv.store import KVStore
from kvflow.request import FinishReason, Request, RequestOutput, SamplingParams
from kvflow.scheduler import StepPlan, StepResult
from tests.guarantee_settings import examples
from tests.kv_shadow import ShadowError, ShadowRunner, expected_output, shadow_config

Mode = Literal["whole", "break", "aclose", "cancel", "abort"]
IDS = ("a", "b", "c")


@dataclass(frozen=True)
class Call:
    """One `generate` of a client: its prompt, and how the client leaves the stream
    (after `after` outputs for all but "whole")."""

    request_id: str
    group: int
    num_shared: int
    suffix: int
    max_new: int
    stop: int | None
    mode: Mode
    after: int


calls = st.builds(
    Call,
    request_id=st.sampled_from(IDS),
    group=st.integers(0, 1),
    num_shared=st.integers(0, 8),
    suffix=st.integers(1, 8),
    max_new=st.integers(1, 8),
    stop=st.none() | st.integers(1, 97),
    mode=st.sampled_from(["whole", "whole", "break", "aclose", "cancel", "abort"]),
    after=st.integers(0, 3),
)
knobs = st.fixed_dictionaries(
    {
        "kv.block_size": st.sampled_from([2, 4]),
        "kv.device.num_blocks": st.integers(8, 16),
        "kv.cpu.num_blocks": st.integers(0, 8),
        "kv.disk.num_blocks": st.integers(0, 8),
        "kv.write_policy": st.sampled_from(["write_back", "write_through"]),
        "kv.load_policy": st.sampled_from(["auto", "always"]),
        "scheduler.preemption_mode": st.sampled_from(["auto", "swap", "recompute"]),
        "scheduler.max_num_seqs": st.integers(1, 4),
        "scheduler.max_num_batched_tokens": st.integers(4, 16),
    }
)


class RecordingShadow(ShadowRunner):
    """The shadow runner; what it finds is kept (the engine would turn it into one
    request's failure)."""

    def __init__(self, store: KVStore, overlap: bool) -> None:
        super().__init__(store, overlap=overlap, step_s=0.0)
        self.errors: list[ShadowError] = []

    def execute(self, plan: StepPlan) -> StepResult:
        try:
            return super().execute(plan)
        except ShadowError as err:
            self.errors.append(err)
            raise


def request_of(call: Call, serial: int, bs: int) -> Request:
    prompt = [1000 + 100 * call.group + k for k in range(call.num_shared * bs // 2)]
    prompt += [20_000 + 100 * serial + k for k in range(call.suffix)]
    stops = (call.stop,) if call.stop is not None else ()
    return Request(
        call.request_id, prompt, call.max_new, sampling=SamplingParams(stop_token_ids=stops)
    )


class Client:
    """Runs one id's calls one after another and checks every output it reads."""

    def __init__(self, engine: AsyncEngine, bs: int) -> None:
        self.engine = engine
        self.bs = bs
        self.finals: list[tuple[Request, FinishReason | None, list[int]]] = []
        self.num_retries = 0

    async def run(self, script: list[tuple[int, Call]]) -> None:
        previous: Mode | None = None
        for serial, call in script:
            req = request_of(call, serial, self.bs)
            for _ in range(2000):  # after a plain `break`, the id frees when collected
                try:
                    await self.one(req, call)
                    break
                except RequestIdInUseError:
                    assert previous == "break", f"id {req.request_id!r} in use after {previous}"
                    self.num_retries += 1
                    await anyio.sleep(0.001)
            else:
                raise AssertionError(f"id {req.request_id!r} never freed")
            previous = call.mode

    async def one(self, req: Request, call: Call) -> None:
        want = expected_output(req)
        got: list[int] = []
        last: RequestOutput | None = None

        def check(out: RequestOutput) -> None:
            nonlocal last
            got.extend(out.new_token_ids)
            assert got == want[: len(got)], f"{req.request_id}: {got}, want a prefix of {want}"
            last = out

        if call.mode == "whole":
            async for out in self.engine.generate(req):
                check(out)
        elif call.mode == "break":
            async for out in self.engine.generate(req):
                check(out)
                if len(got) > call.after or out.finished:
                    break
        elif call.mode == "aclose":
            async with contextlib.aclosing(self.engine.generate(req)) as stream:
                async for out in stream:
                    check(out)
                    if len(got) > call.after:
                        break
        elif call.mode == "cancel":
            with anyio.CancelScope() as scope:
                async for out in self.engine.generate(req):
                    check(out)
                    if len(got) > call.after:
                        scope.cancel()
        else:
            async for out in self.engine.generate(req):
                check(out)
                if len(got) > call.after and not out.finished:
                    assert self.engine.abort(req.request_id)
        reason = last.finish_reason if last is not None and last.finished else None
        if reason in (FinishReason.LENGTH, FinishReason.STOP):
            assert got == want, f"{req.request_id} finished {reason} with {got}, want {want}"
        if call.mode in ("whole", "abort"):
            assert reason is not None, f"{req.request_id}: the stream ended without a final output"
        self.finals.append((req, reason, got))


def drive(settings_: dict[str, Any], policy: str, overlap: bool, script: list[Call]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = shadow_config(settings_, tmp)
        store = KVStore.with_tensors(config.kv)
        try:
            anyio.run(run_script, config, store, policy, overlap, script)
        finally:
            store.close()


async def run_script(
    config: KVFlowConfig, store: KVStore, policy: str, overlap: bool, script: list[Call]
) -> None:
    runner = RecordingShadow(store, overlap)
    bs = config.kv.block_size
    # Three ids, so never more than three streams: an overload is a failure.
    engine = AsyncEngine(config, runner, policy, store, overlap=overlap, max_num_pending=8)
    clients = {rid: Client(engine, bs) for rid in IDS}
    with anyio.fail_after(30):
        async with engine, anyio.create_task_group() as tg:
            for rid, client in clients.items():
                mine = [(i, c) for i, c in enumerate(script) if c.request_id == rid]
                tg.start_soon(client.run, mine)
    assert not runner.errors, runner.errors[0]
    sched = engine.scheduler
    assert not sched.has_unfinished and not engine._streams
    sched.check_integrity()
    assert sched.num_leaked_blocks() == 0
    for tier, pool in (("device", store.device), ("cpu", store.cpu), ("disk", store.disk)):
        assert pool is None or pool.num_used_blocks == 0, f"{tier} blocks still referenced"
    finals = [f for c in clients.values() for f in c.finals]
    event(f"overlap={overlap}, overlapped steps={engine.num_overlapped_steps > 0}")
    event(f"preempted={sched.stats.num_preemptions > 0}")
    event(f"retried a reused id={any(c.num_retries for c in clients.values())}")
    event(f"aborted={any(r is FinishReason.ABORTED for _, r, _ in finals)}")


POLICIES = st.sampled_from(["fcfs", "lpm", "priority", "fair"])
NUM_EXAMPLES = 500
NUM_EXAMPLES_SLOW = 6000


def run(num_examples: int, slow: bool) -> None:
    num_runs = 0

    @examples(num_examples, slow=slow)
    @given(
        settings_=knobs,
        policy=POLICIES,
        overlap=st.booleans(),
        script=st.lists(calls, max_size=10),
    )
    def case(settings_: dict[str, Any], policy: str, overlap: bool, script: list[Call]) -> None:
        nonlocal num_runs
        num_runs += 1
        drive(settings_, policy, overlap, script)

    case()
    assert num_runs >= num_examples
    print(f"engine model: {num_runs} scripts")


def test_engine_model() -> None:
    run(NUM_EXAMPLES, slow=False)


@pytest.mark.slow
def test_engine_model_slow() -> None:
    run(NUM_EXAMPLES_SLOW, slow=True)
