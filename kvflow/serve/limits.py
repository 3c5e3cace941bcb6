"""What an HTTP front end (`kvflow serve`, `kvflow router`) checks before a request
reaches its handlers: the API key, the size of the body, and how many requests are in
flight. An ASGI middleware, so it wraps any app and costs a few dict lookups per request.

- API key (`--api-key`, or `KVFLOW_API_KEY`): every endpoint but `/health` needs
  `Authorization: Bearer KEY` (as vLLM's `--api-key`); else 401. The key is compared in
  constant time.
- Body size: a request whose body is larger than `max_body_bytes` is answered 413 without
  reading more of it than that.
- Requests in flight: a POST beyond `max_concurrent_requests` (counted until its
  response's last byte, streams included) is answered 429 with `Retry-After`.

Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

API_KEY_ENV = "KVFLOW_API_KEY"
"""The environment variable that gives the API key when `--api-key` is not passed."""
UNGUARDED_PATHS = frozenset({"/health"})
"""Endpoints answered without the API key (health checks of load balancers)."""

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]
"""Any ASGI app: called with (scope, receive, send)."""


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """What the front end enforces (see the module's docstring)."""

    api_key: str | None = None
    """Clients must send `Authorization: Bearer <api_key>` (None: no key needed)."""
    max_body_bytes: int = 32 * 2**20
    """Largest request body taken (larger: 413)."""
    max_concurrent_requests: int = 4096
    """Most POST requests in flight, streams included (more: 429)."""

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        for name in ("max_body_bytes", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    """OpenAI's error shape: `{"error": {"message", "type": kind, "param", "code"}}`."""
    info = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": info}).encode()


async def reply(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    media_type: bytes = b"application/json",
) -> None:
    """A whole response: `body` with its type and length, and `headers`."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HTTPGuard:
    """Wraps an ASGI app with the checks of `limits`; `on_refused` is called with the
    status (401, 413 or 429) of each POST refused here, which never reaches the app.

    Attributes:
        num_in_flight: POST requests being answered now.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: HTTPLimits,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_refused = on_refused
        self._token = limits.api_key.encode() if limits.api_key is not None else None
        self.num_in_flight = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        post = scope["method"] == "POST"
        guarded = self._token is not None and scope["path"] not in UNGUARDED_PATHS
        if guarded and not self._authorized(scope):
            await self._refuse(send, 401, post)
            return
        if not post:
            await self.app(scope, receive, send)
            return
        limits = self.limits
        if self.num_in_flight >= limits.max_concurrent_requests:
            await self._refuse(send, 429, post)
            return
        self.num_in_flight += 1
        try:
            messages = await self._read_body(scope, receive)
            if messages is None:
                await self._refuse(send, 413, post)
                return
            messages.reverse()

            async def replay() -> Message:
                # The body as it came (a client gone mid-body: its disconnect too), then
                # whatever comes next (the disconnect, when it comes).
                return messages.pop() if messages else await receive()

            await self.app(scope, replay, send)
        finally:
            self.num_in_flight -= 1

    def _authorized(self, scope: MutableMapping[str, Any]) -> bool:
        assert self._token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = bytes(value).partition(b" ")
                # Constant time: how much of a guess matches must not show in the timing.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self._token
                )
        return False

    async def _read_body(
        self, scope: MutableMapping[str, Any], receive: Receive
    ) -> list[Message] | None:
        """The messages of the whole body (ending with the disconnect when the client left
        before its end), or None when it is larger than the limit (read no further)."""
        limit = self.limits.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass  # the server refuses a malformed length before the app
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                return messages
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, send: Send, status: int, post: bool) -> None:
        if post and self.on_refused is not None:
            self.on_refused(status)
        limits = self.limits
        headers: list[tuple[bytes, bytes]] = []
        if status == 401:
            message = (
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                "with the key the server was started with (--api-key)"
            )
            body = error_body(message, "invalid_request_error", "invalid_api_key")
            headers.append((b"www-authenticate", b"Bearer"))
        elif status == 413:
            message = (
                f"the request body is larger than {limits.max_body_bytes} bytes, the most "
                "this server takes (--max-body-bytes)"
            )
            body = error_body(message, "invalid_request_error", "request_too_large")
        else:
            message = (
                f"{self.num_in_flight} requests in flight, the most this server takes "
                f"(--max-concurrent-requests {limits.max_concurrent_requests}); retry later"
            )
            body = error_body(message, "rate_limit_error", "too_many_requests")
            headers.append((b"retry-after", b"1"))
        await reply(send, status, body, headers)


__all__ = ["API_KEY_ENV", "UNGUARDED_PATHS", "HTTPGuard", "HTTPLimits", "error_body", "reply"]
