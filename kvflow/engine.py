"""The async serving loop around the pure scheduler core.

    async with AsyncEngine(config, runner) as engine:
        async for out in engine.generate(request):
            ...

One task runs the step loop: plan (in the event loop, it never blocks), the runner's
forward pass in a worker thread, commit, then the new tokens go to each request's
stream. Tier copies run in the store's own threads meanwhile. Runs on anyio (asyncio,
with uvloop when asked for, or trio).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_outputs import RequestStream, joined_output
from kvflow.kv.store import KVStore
from kvflow.policies import make_policy
from kvflow.policies.base import Policy
from kvflow.request import FinishReason, Request, RequestOutput, RequestState
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult


class EngineOverloadedError(RuntimeError):
    """`generate` was called while `max_num_pending` requests were in flight."""


class EngineClosedError(RuntimeError):
    """`generate` was called on an engine that is closing or closed (or whose step loop
    failed: `__cause__` says how)."""


class RequestIdInUseError(ValueError):
    """`generate` or `submit` got the id of a request whose stream has not ended.

    An id is free again as soon as its stream has ended: its final output was sent (the
    iteration may not have read it yet), `abort(id)` returned True, or its `generate`
    iterator was closed (`contextlib.aclosing`, or its consumer's task cancelled).
    After a plain `break` out of `async for`, Python closes the iterator only when it
    is garbage-collected, so wrap it in `contextlib.aclosing` to reuse the id at once.
    """


class RequestFailedError(RuntimeError):
    """Raised by `generate` when the runner raised while executing a step of this
    request (`__cause__` is the runner's exception) or the engine's step loop failed.
    The outputs yielded before it stand; the request's blocks are freed, and the engine
    goes on serving the requests that were not in that step.

    Attributes:
        request_id: the failed request's id.
    """

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot of an engine (see `AsyncEngine.statistics`)."""

    num_waiting: int
    num_running: int
    num_waiting_for_kv: int
    num_steps: int
    num_finished: int
    num_preemptions: int
    prefix_hit_rate: float
    """Prompt tokens found cached at requests' first admissions / their prompt tokens."""
    hit_tokens_by_tier: dict[str, int]
    """First admissions' hit tokens by tier."""
    blocks_used_by_tier: dict[str, int]
    blocks_total_by_tier: dict[str, int]
    readmission_hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    """Hit tokens of preempted requests admitted again, by tier (apart from the rate)."""


class AsyncEngine:
    """Serves requests through a scheduler and a runner.

    Args:
        config: the whole configuration.
        runner: executes plans (simulated, torch, Hugging Face).
        policy: a policy instance or a registered name.
        store: the KV store; a simulated one from `config.kv` by default (a real runner
            needs `KVStore.with_tensors` so its cache is the device tier).
        max_num_pending: most requests in flight; `generate` beyond it raises
            `EngineOverloadedError` at once (back-pressure).
        on_close: what `aclose` does with requests in flight: "drain" (finish them) or
            "abort" them.
        overlap: plan step N+1 while step N runs, when the runner allows it
            (`ModelRunner.supports_overlap`); step N+1 then executes after step N's
            commit, and takes no preemption (a request short of blocks waits a step).
        clock: seconds, monotonic; time for the scheduler and the outputs' timestamps.
    """

    def __init__(
        self,
        config: KVFlowConfig,
        runner: ModelRunner,
        policy: Policy | str = "fcfs",
        store: KVStore | None = None,
        *,
        max_num_pending: int = 4096,
        on_close: Literal["drain", "abort"] = "drain",
        overlap: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_num_pending < 1:
            raise ValueError(f"max_num_pending must be >= 1, got {max_num_pending!r}")
        if on_close not in ("drain", "abort"):
            raise ValueError(f"on_close must be 'drain' or 'abort', got {on_close!r}")
        if isinstance(policy, str):
            policy = make_policy(policy, config)
        self.config = config
        self.runner = runner
        self.scheduler = Scheduler(config, policy, store, model=runner.model_info)
        self.max_num_pending = max_num_pending
        self.on_close = on_close
        self.overlap = overlap
        self.num_overlapped_steps = 0
        """Steps planned while the previous step ran."""
        self.clock = clock
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._closing = False
        self._stopped = anyio.Event()
        self._num_finished = 0
        self._error: BaseException | None = None
        # While the runner executes a step it may still read an aborted request's
        # blocks: the scheduler releases them only after the step (`release_deferred`).
        self._executing = False
        self._num_rejected_seen = 0

    # -- lifecycle -----------------------------------------------------------------
    async def __aenter__(self) -> AsyncEngine:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._step_loop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking requests; drain or abort those in flight (per `on_close`); stop
        the loop. Idempotent."""
        if self._task_group is None:
            return
        self._closing = True
        if self.on_close == "abort":
            for rid in list(self._streams):
                self.abort(rid)
        self._wake()
        task_group, self._task_group = self._task_group, None
        await self._stopped.wait()
        await task_group.__aexit__(None, None, None)
        self.scheduler.store.drain(self.clock())

    # -- requests ------------------------------------------------------------------
    async def generate(
        self, request: Request, *, coalesce: bool = False
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs: one `RequestOutput` per step that produced tokens
        (with `coalesce`, one per resumption of the consumer, holding every step's tokens
        since the last: a consumer slower than the steps catches up in one go, as a server
        writing each output to a socket wants), the last with `finished=True` and a
        finish reason (`length`, `stop`, `aborted`,
        or `rejected` with the reason in `finish_detail`: a request the model or the
        configuration can never serve is answered at once, never raised). Leaving the
        iteration early (an exception, the consumer's task being cancelled, closing the
        iterator, or a `break` once the iterator is collected) aborts the request and
        frees its blocks.

        Raises:
            EngineOverloadedError: too many requests in flight.
            EngineClosedError: the engine is closing.
            RequestIdInUseError: the id's previous stream has not ended.
            ValueError: the request asks for log-probabilities and the runner computes
                none (`ModelRunner.supports_logprobs`).
            RequestFailedError: the runner raised while executing a step of this
                request (its outputs so far were yielded).
        """
        stream = self.submit(request)
        receive = stream.receive
        held: RequestOutput | None = None
        try:
            async with receive:
                while True:
                    if held is not None:
                        out, held = held, None
                    else:
                        got = await receive.get()
                        if got is None:
                            return
                        out = got
                    while coalesce and not out.finished:
                        later = receive.get_nowait()
                        if later is None:
                            break
                        if later.finish_reason is FinishReason.ERROR:
                            held = later  # the tokens before the error are yielded first
                            break
                        out = joined_output(out, later)
                    if out.finish_reason is FinishReason.ERROR:
                        raise RequestFailedError(
                            request.request_id,
                            f"request {request.request_id!r} failed: {out.finish_detail}",
                        ) from stream.error
                    yield out
                    if out.finished:
                        return
        finally:
            self._abort_stream(stream)

    def submit(self, request: Request) -> RequestStream:
        """Queue a request now; `generate` is the usual way in."""
        if self._closing or self._task_group is None:
            raise EngineClosedError("the engine is not running (use `async with`)")
        if self._error is not None:
            raise EngineClosedError(
                f"the engine's step loop failed: {self._error!r}"
            ) from self._error
        rid = request.request_id
        if request.sampling.logprobs is not None and not self.runner.supports_logprobs:
            raise ValueError(
                f"request {rid!r}: logprobs={request.sampling.logprobs!r}, but runner "
                f"{self.runner.name!r} computes no log-probabilities"
            )
        if rid in self._streams:
            raise RequestIdInUseError(f"request id {rid!r} is in use: its stream has not ended")
        if len(self._streams) >= self.max_num_pending:
            raise EngineOverloadedError(
                f"{len(self._streams)} requests in flight, the limit is {self.max_num_pending}"
            )
        now = self.clock()
        # Arrival is when the engine got it, on the engine's clock.
        state = self.scheduler.add(dataclasses.replace(request, arrival_time=now), now)
        stream = RequestStream(state)
        if state.is_finished:  # rejected at admission
            stream.push(final=True)
            self._num_finished += 1
            return stream
        self._streams[rid] = stream
        self._wake()
        return stream

    def abort(self, request_id: str) -> bool:
        """Abort a request in flight; its stream ends with reason `aborted` and its id
        is free at once. Returns False when no stream of that id is in flight."""
        stream = self._streams.get(request_id)
        return stream is not None and self._abort_stream(stream)

    def _abort_stream(self, stream: RequestStream) -> bool:
        """End `stream` as aborted, if it is still the live stream of its id (a
        finished one, or an id reused since, is left alone)."""
        state = stream.state
        if self._streams.get(state.request_id) is not stream:
            return False
        del self._streams[state.request_id]
        if not state.is_finished:
            # While a step runs, the runner may still read the request's blocks: the
            # scheduler frees them after the step (`release_deferred`).
            self.scheduler.abort(state.request_id, self.clock(), defer_release=self._executing)
            self._num_finished += 1
        stream.push(final=True)
        return True

    def statistics(self) -> EngineStatistics:
        sched = self.scheduler
        store = sched.store
        pools = {"device": store.device, "cpu": store.cpu, "disk": store.disk}
        return EngineStatistics(
            num_waiting=len(sched.waiting),
            num_running=len(sched.running),
            num_waiting_for_kv=len(sched.loading),
            num_steps=sched.stats.num_steps,
            num_finished=self._num_finished,
            num_preemptions=sched.stats.num_preemptions,
            prefix_hit_rate=sched.stats.prefix_hit_rate,
            hit_tokens_by_tier=dict(sched.stats.hit_tokens_by_tier),
            readmission_hit_tokens_by_tier=dict(sched.stats.readmission_hit_tokens_by_tier),
            blocks_used_by_tier={t: p.num_used_blocks for t, p in pools.items() if p},
            blocks_total_by_tier={t: p.num_blocks for t, p in pools.items() if p},
        )

    # -- the loop --------------------------------------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()

    async def _step_loop(self) -> None:
        sched = self.scheduler
        overlap = self.overlap and self.runner.supports_overlap
        plan: StepPlan | None = None
        try:
            while True:
                if plan is None:
                    if not sched.has_unfinished:
                        if self._closing:
                            return
                        if sched.store.num_inflight:
                            # Copies started by the last step (demotions of finished
                            # requests' blocks) land while idle: index and unpin them.
                            t_next = sched.store.next_event_time()
                            if t_next is None:  # real copies
                                await anyio.to_thread.run_sync(sched.store.wait, 0.05)
                            else:  # modelled ones: sleep (a little at least) until due
                                due = min(0.05, max(0.005, t_next - self.clock()))
                                await self._sleep_until_woken(due)
                            sched.reap_copies(self.clock())
                            continue
                        await self._sleep_until_woken()
                        continue
                    plan = sched.plan(self.clock())
                    self._end_dropped_streams()
                    if plan.is_empty:
                        plan = None
                        if sched.store.num_inflight:
                            await anyio.to_thread.run_sync(sched.store.wait, 0.05)
                        else:
                            await self._sleep_until_woken(0.05)
                        continue
                outcome, next_plan = await self._execute(plan, overlap)
                if isinstance(outcome, StepResult):
                    sched.commit(plan, outcome, self.clock())
                else:
                    self._fail(plan.requests, outcome)
                self._route_outputs(plan)
                plan = next_plan if next_plan is not None and not next_plan.is_empty else None
                await anyio.lowlevel.checkpoint()
        except Exception as err:
            # A bug in planning or committing: every caller in flight gets the error
            # (never a bare cancellation), and the engine takes no more requests.
            self._error = err
            self._fail([s.state for s in self._streams.values()], err)
            for stream in list(self._streams.values()):
                self._abort_stream(stream)
        except BaseException:
            for stream in list(self._streams.values()):
                self._abort_stream(stream)
            raise
        finally:
            self._stopped.set()

    def _route_outputs(self, plan: StepPlan) -> None:
        """Send a step's new tokens to the streams of the plan's requests. A request's
        stream is found by identity: an entry that finished earlier (it stayed in a plan
        made ahead) never reaches a new request that reuses its id."""
        streams = self._streams
        for req in plan.requests:
            stream = streams.get(req.request_id)
            if stream is None or stream.state is not req:
                continue
            if req.is_finished:
                del streams[req.request_id]
                self._num_finished += 1
                stream.push(final=True)
            elif req.num_output_tokens > stream.num_sent:
                stream.push(final=False)

    def _fail(self, states: list[RequestState], error: BaseException) -> None:
        """Finish the unfinished `states` with reason `error` (their streams raise
        `RequestFailedError` from `error`); their blocks are freed."""
        now = self.clock()
        detail = f"{type(error).__name__}: {error}"
        for state in states:
            if state.is_finished:
                continue
            stream = self._streams.get(state.request_id)
            if stream is not None and stream.state is state:
                stream.error = error
            with contextlib.suppress(Exception):  # a broken scheduler must not hide `error`
                self.scheduler.abort(
                    state.request_id, now, reason=FinishReason.ERROR, detail=detail
                )
            if stream is not None and stream.state is state:
                del self._streams[state.request_id]
                self._num_finished += 1
                stream.push(final=True)

    def _end_dropped_streams(self) -> None:
        """End the streams of requests the policy dropped while planning (rejected)."""
        num_rejected = self.scheduler.stats.num_rejected
        if num_rejected == self._num_rejected_seen:
            return
        self._num_rejected_seen = num_rejected
        for stream in [s for s in self._streams.values() if s.state.is_finished]:
            del self._streams[stream.state.request_id]
            self._num_finished += 1
            stream.push(final=True)

    async def _execute(
        self, plan: StepPlan, overlap: bool
    ) -> tuple[StepResult | Exception, StepPlan | None]:
        """Run `plan` in a worker thread; with `overlap`, plan the next step meanwhile
        (it executes after this step's commit, so it sees this step's tokens). Returns
        the step's result (or what the runner raised) and the next plan."""
        results: list[StepResult] = []
        errors: list[Exception] = []
        next_plan: StepPlan | None = None

        async def run() -> None:
            try:
                results.append(await anyio.to_thread.run_sync(self.runner.execute, plan))
            except Exception as err:  # the step's requests fail; the engine serves on
                errors.append(err)

        planning_error: Exception | None = None
        self._executing = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                # After a plan that left a request short of blocks, the next one is made
                # after the commit, when it may preempt.
                if overlap and not self.scheduler.last_plan_short_of_blocks:
                    await anyio.lowlevel.checkpoint()  # the step starts first
                    try:
                        next_plan = self.scheduler.plan(self.clock(), overlapped=True)
                    except Exception as err:  # raised below as itself, not in a group
                        planning_error = err
                    else:
                        self._end_dropped_streams()
                        if not next_plan.is_empty:
                            self.num_overlapped_steps += 1
        finally:
            self._executing = False
            self.scheduler.release_deferred(self.clock())
        if planning_error is not None:
            raise planning_error
        return (errors[0] if errors else results[0]), next_plan

    async def _sleep_until_woken(self, timeout_s: float | None = None) -> None:
        with anyio.move_on_after(timeout_s):
            await self._wakeup.wait()
        self._wakeup = anyio.Event()
