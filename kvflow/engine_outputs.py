"""What the engine hands its callers per request: `OutputChannel` (the outputs, from the
step loop to their reader) and `RequestStream` (a request's state and its channel, which
the step loop pushes each step's new tokens through)."""

from __future__ import annotations

import dataclasses
from collections import deque

import anyio

from kvflow.request import FinishReason, RequestOutput, RequestState


class OutputChannel:
    """One request's outputs, from the step loop to their reader: a buffer, and one
    event while the reader waits. `async for out in channel` reads to the final output.

    It does per output what an anyio memory object stream would, for less: no
    checkpoint (a trip round the event loop) before each item, and no objects but the
    event when the reader has to wait; a server streaming thousands of tokens a second
    spends a large part of its time here.
    """

    __slots__ = ("_buffer", "_closed", "_waiter")

    def __init__(self) -> None:
        self._buffer: deque[RequestOutput] = deque()
        self._closed = False
        self._waiter: anyio.Event | None = None

    def put(self, out: RequestOutput) -> None:
        """Hand `out` to the reader (dropped once the channel is closed)."""
        if self._closed:
            return
        self._buffer.append(out)
        self._wake()

    def close(self) -> None:
        """No more outputs: the reader gets those buffered, then the end."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def get_nowait(self) -> RequestOutput | None:
        """The next buffered output, or None."""
        return self._buffer.popleft() if self._buffer else None

    async def get(self) -> RequestOutput | None:
        """The next output, waiting for it; None at the end."""
        while not self._buffer:
            if self._closed:
                return None
            waiter = self._waiter = anyio.Event()
            await waiter.wait()
        return self._buffer.popleft()

    def __aiter__(self) -> OutputChannel:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self.get()
        if out is None:
            raise StopAsyncIteration
        return out

    async def __aenter__(self) -> OutputChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """The reader is done: later outputs are dropped."""
        self._closed = True
        self._buffer.clear()


class RequestStream:
    """A request's state in the engine and its outputs' channel: what the step loop
    pushes each step's new tokens through (`push`), and what `generate` reads."""

    __slots__ = ("error", "num_sent", "receive", "state")

    def __init__(self, state: RequestState) -> None:
        self.state = state
        self.num_sent = 0
        self.error: BaseException | None = None
        """What failed the request (its final output has finish reason `error`)."""
        self.receive = OutputChannel()
        """The reading end (`generate` reads it; so may a caller of `submit`)."""

    def push(self, final: bool) -> None:
        """Send the state's tokens since the last push (and, with `final`, the end: a
        request the scheduler could not finish ends aborted, or errored with `error`)."""
        state = self.state
        new = state.output_token_ids[self.num_sent :]
        self.num_sent = state.num_output_tokens
        if new or final:
            out = RequestOutput.of(state, new)
            if final and not out.finished:  # the scheduler could not finish it
                reason = FinishReason.ABORTED if self.error is None else FinishReason.ERROR
                detail = "aborted" if self.error is None else repr(self.error)
                out = dataclasses.replace(
                    out, finished=True, finish_reason=reason, finish_detail=detail
                )
            self.receive.put(out)
        if final:
            self.receive.close()


def joined_output(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output for two consecutive ones of a request: both's tokens, `then`'s state."""
    logprobs = first.logprobs
    if logprobs is not None:
        logprobs += then.logprobs or ()
    return dataclasses.replace(
        then, new_token_ids=first.new_token_ids + then.new_token_ids, logprobs=logprobs
    )


__all__ = ["OutputChannel", "RequestStream", "joined_output"]
