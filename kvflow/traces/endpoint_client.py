"""The HTTP side of replaying against an endpoint: connections, one streamed request,
and the checks made before the clock starts. httpx (anyio-native) does the HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from kvflow.request import Request
from kvflow.traces.endpoint_prompts import OPTIONAL_FIELDS, Api, PromptFormat, request_body

if TYPE_CHECKING:
    import httpx

FINISH_REASONS = ("length", "stop")
"""Finish reasons of a served request; any other (vLLM's "abort", ...) fails it."""
_MAX_ERROR_CHARS = 300


class EndpointError(RuntimeError):
    """The server cannot be reached or used, or no request of the run was served."""


class RequestFailed(Exception):
    """One request failed; `kind` groups failures in the report (`HTTP 503`, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class Streamed:
    """What one streamed response said: when each token came, how it ended, its usage."""

    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


class Connections:
    """Up to `max_connections` keep-alive connections, each an `httpx.AsyncClient` with a
    pool of one; a request takes a free one (or opens one) and gives it back.

    One shared httpx pool would do the same, but its bookkeeping costs time that grows
    with the number of requests in flight: with 64 concurrent streams from one client on
    this project's 2-core machine, TTFT p50 was ~0.8 s against ~60 ms with a client per
    connection (same server, same run), and streamed tokens/s halved.
    """

    def __init__(self, make_client: Callable[[], httpx.AsyncClient], max_connections: int) -> None:
        self._make_client = make_client
        self._free: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []
        self._slots = anyio.Semaphore(max_connections)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client with a connection of its own while the block runs."""
        async with self._slots:
            if self._free:
                client = self._free.pop()
            else:
                client = self._make_client()
                self._all.append(client)
            try:
                yield client
            finally:
                self._free.append(client)

    async def aclose(self) -> None:
        for client in self._all:
            await client.aclose()
        self._all.clear()
        self._free.clear()


def client_maker(
    base_url: str, timeout_s: float, api_key: str | None = None
) -> Callable[[], httpx.AsyncClient]:
    """What makes the clients of `Connections`: a pool of one connection each, `timeout_s`
    for each read and write (10 s at most to connect), the API key as a bearer token.
    They share one TLS context: each client making its own loads the CA store (~15 ms)."""
    import ssl

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()

    def make() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=base_url, headers=headers, limits=one, timeout=timeout, verify=tls
        )

    return make


async def stream_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], clock: Callable[[], float]
) -> Streamed:
    """Send one streamed request and read its events to `data: [DONE]`.

    Raises:
        RequestFailed: an HTTP error status, a transport error or timeout, a stream that
            ends early or without tokens, an error event, or a finish reason other than
            length or stop.
    """
    import httpx

    streamed = Streamed()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                raise RequestFailed(
                    f"HTTP {response.status_code}",
                    f"HTTP {response.status_code}: {error_message(text)}",
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    streamed.done = True
                    break
                _on_chunk(streamed, data, clock())
    except httpx.HTTPError as err:
        kind = type(err).__name__
        raise RequestFailed(kind, f"{kind}: {err or 'no detail'}") from None
    if not streamed.done:
        raise RequestFailed("stream dropped", "stream dropped: it ended without data: [DONE]")
    if not streamed.token_times:
        raise RequestFailed(
            "no tokens", f"no tokens streamed (finish_reason {streamed.finish_reason!r})"
        )
    if streamed.finish_reason not in FINISH_REASONS:
        reason = streamed.finish_reason
        raise RequestFailed(f"finish_reason {reason}", f"finish_reason {reason!r}")
    return streamed


def _on_chunk(streamed: Streamed, data: str, now: float) -> None:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise RequestFailed("bad chunk", f"bad chunk (not JSON): {data[:100]!r}") from None
    if not isinstance(chunk, dict):
        raise RequestFailed("bad chunk", f"bad chunk (not an object): {data[:100]!r}")
    if "error" in chunk:
        raise RequestFailed("error in stream", f"error in stream: {error_message(data)}")
    if chunk.get("usage"):
        streamed.usage = chunk["usage"]
    for choice in chunk.get("choices") or ():
        num_tokens = _num_tokens(choice)
        if num_tokens:
            times = streamed.token_times
            previous = times[-1] if times else now
            step = (now - previous) / num_tokens
            times.extend(now - step * (num_tokens - 1 - i) for i in range(num_tokens))
        if choice.get("finish_reason"):
            streamed.finish_reason = choice["finish_reason"]


def _num_tokens(choice: dict[str, Any]) -> int:
    """Tokens in a streamed choice: its `token_ids` when it has them, else one if it has
    text (completions) or content (chat, reasoning included)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if choice.get("text"):
        return 1
    delta = choice.get("delta") or {}
    return 1 if delta.get("content") or delta.get("reasoning_content") else 0


def error_message(text: str) -> str:
    """The message of an OpenAI-style error body (or FastAPI's `detail`), else the text;
    on one line, shortened."""
    try:
        doc = json.loads(text)
        error = doc.get("error", doc) if isinstance(doc, dict) else doc
        message = error.get("message") if isinstance(error, dict) else None
        if message is None and isinstance(doc, dict):
            message = doc.get("detail") or doc.get("message")
        if message is not None:
            text = str(message)
    except json.JSONDecodeError:
        pass
    text = " ".join(text.split())
    return text[:_MAX_ERROR_CHARS] + ("..." if len(text) > _MAX_ERROR_CHARS else "")


def _unreachable(where: str, err: Exception) -> EndpointError:
    return EndpointError(f"cannot reach {where}: {type(err).__name__}: {err or 'no detail'}")


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id of `GET /v1/models`.

    Raises:
        EndpointError: the server is unreachable or lists no model.
    """
    import httpx

    where = f"{base_url}/v1/models"
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as err:
        raise _unreachable(where, err) from None
    if response.status_code != 200:
        raise EndpointError(
            f"GET {where} answered HTTP {response.status_code}: {error_message(response.text)} "
            "(name the model with --model)"
        )
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(
            f"GET {where} listed no model id: {response.text[:200]!r} (name it with --model)"
        ) from None


async def probe(
    client: httpx.AsyncClient,
    where: str,
    path: str,
    *,
    sample: Request,
    model: str,
    api: Api,
    prompt_format: PromptFormat,
    vocab_size: int,
) -> frozenset[str]:
    """Before the clock starts: one small request (`sample`'s first prompt token, one
    output token, not streamed) that fails the run early on a bad model, key or URL,
    and finds which of `OPTIONAL_FIELDS` the server refuses (names in a 400 or 422):
    those are left out of every request.

    Raises:
        EndpointError: the server is unreachable or refuses the request otherwise.
    """
    import httpx

    small = Request("probe", sample.prompt_token_ids[:1], 1)
    omit: set[str] = set()
    for _ in range(len(OPTIONAL_FIELDS) + 1):
        body = request_body(
            small,
            model=model,
            api=api,
            prompt_format=prompt_format,
            vocab_size=vocab_size,
            omit=frozenset(omit),
        )
        body["stream"] = False
        del body["stream_options"]
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as err:
            raise _unreachable(where, err) from None
        if response.status_code == 200:
            return frozenset(omit)
        message = error_message(response.text)
        refused = {name for name in OPTIONAL_FIELDS if name not in omit and name in message}
        if response.status_code not in (400, 422) or not refused:
            raise EndpointError(f"POST {where} answered HTTP {response.status_code}: {message}")
        omit |= refused
    raise EndpointError(f"POST {where} refused every body tried")  # pragma: no cover


__all__ = [
    "FINISH_REASONS",
    "Connections",
    "EndpointError",
    "RequestFailed",
    "Streamed",
    "client_maker",
    "error_message",
    "first_model",
    "probe",
    "stream_request",
]
