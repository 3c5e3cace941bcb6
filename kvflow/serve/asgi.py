"""The generation endpoints' HTTP side as plain ASGI: the body in, a JSON answer or an
event stream out, and the client's disconnect noticed.

FastAPI serves every other route. The two generation endpoints skip its per-request
machinery (routing, dependency solving, the `Request` object, and above all
`StreamingResponse`'s anyio task group): on the 2-core machine this project is
measured on, that machinery cost ~190 us of CPU per streamed request, against ~10 us
here, and a burst of concurrent requests waits for all of it before its first token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
_LAST_BODY = {"type": "http.response.body", "body": b"", "more_body": False}


class ClientGoneError(Exception):
    """The client disconnected before the request's body was read."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body.

    Raises:
        ClientGoneError: the client disconnected first.
    """
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError("the client disconnected while sending its request")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(
    send: Send, status: int, content: Any, headers: Mapping[str, str] | None = None
) -> None:
    """A whole JSON response (encoded as Starlette's `JSONResponse` does)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    raw_headers = [
        *_JSON_HEADERS,
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body.encode()})


class DisconnectWatch:
    """Cancels the task that made it when the client disconnects before `done()`.

    One small asyncio task waits on `receive`; ASGI servers answer it with
    `http.disconnect` when the connection closes (uvicorn also once the response is
    complete, which ends the watch by itself). The server runs on asyncio (uvicorn),
    so the watch is a plain asyncio task, not an anyio task group. It starts at the
    loop's next turn, so what the caller sends meanwhile (a stream's first chunk) is
    not held back by it.
    """

    __slots__ = ("_done", "_receive", "_target", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._target = asyncio.current_task()
        self._receive = receive
        self._done = False
        self.gone = False
        """The client disconnected before `done()` (and the task was cancelled)."""
        self._watcher: asyncio.Future[None] | None = None
        asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        if not self._done:
            self._watcher = asyncio.ensure_future(self._watch(self._receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._done and self._target is not None:
            self.gone = True
            self._target.cancel()

    def done(self) -> None:
        """The response is complete (or abandoned): the watch no longer cancels; a watch
        the server has not ended by the next turn of the loop is cancelled."""
        self._done = True
        if self._watcher is not None and not self._watcher.done():
            asyncio.get_running_loop().call_soon(self._watcher.cancel)

    def swallow(self, err: asyncio.CancelledError) -> None:
        """Called with a `CancelledError` caught: re-raises it unless it is this watch's
        own cancellation (the client left) and no other is pending."""
        task = asyncio.current_task()
        if not self.gone or task is None or task.uncancel() > 0:
            raise err


async def send_event_stream(
    receive: Receive, send: Send, events: AsyncGenerator[bytes, None]
) -> None:
    """Server-sent events: each of `events` written as it comes. A client that
    disconnects cancels the stream (so its request is aborted at once); `events` is
    always closed."""
    watch = DisconnectWatch(receive)
    try:
        await send(_SSE_START)
        async for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send(_LAST_BODY)
    except asyncio.CancelledError as err:
        watch.swallow(err)
    finally:
        watch.done()
        await events.aclose()


async def unless_gone(receive: Receive, work: Awaitable[Any]) -> tuple[bool, Any]:
    """`(True, result)` of awaiting `work`, or `(False, None)` when the client
    disconnected first (then `work` was cancelled)."""
    watch = DisconnectWatch(receive)
    try:
        return True, await work
    except asyncio.CancelledError as err:
        watch.swallow(err)
        return False, None
    finally:
        watch.done()


class FastRoutes:
    """An ASGI app that sends `POST` requests to the paths of `routes` straight to their
    handlers, and everything else (other methods and paths, lifespan) to `app`."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, ASGIApp]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)


__all__ = [
    "ASGIApp",
    "ClientGoneError",
    "DisconnectWatch",
    "FastRoutes",
    "read_body",
    "send_event_stream",
    "send_json",
    "unless_gone",
]
