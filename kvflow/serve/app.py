"""The FastAPI application: OpenAI's completions, chat completions and models endpoints,
/health and /metrics, around the engine an `EngineHost` runs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from kvflow.request import Request as EngineRequest
from kvflow.serve.errors import APIError, bad_request, install_error_handlers
from kvflow.serve.host import EngineHost, HostStatus
from kvflow.serve.logprobs import LogprobsFormatter
from kvflow.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kvflow.serve.responses import ResponseShape
from kvflow.serve.serving import Generation, OpenAIServing, unavailable


class _EventStream(StreamingResponse):
    """A streaming response that always closes its body iterator, so a client that goes
    away mid-stream aborts its request at once (not whenever the iterator is collected)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def _parse(request: Request, model: type[CompletionRequest | ChatCompletionRequest]) -> Any:
    """The body as `model`; invalid JSON or fields raise `RequestValidationError`."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the body is not valid JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None


async def _collect_unless_gone(
    request: Request,
    api: OpenAIServing,
    gen: Generation,
    stops: list[str],
    logprobs: LogprobsFormatter | None,
) -> tuple[str, str, int]:
    """`api.collect`, cancelled (aborting the request) when the client disconnects."""
    result: list[tuple[str, str, int]] = []

    async def watch(scope: anyio.CancelScope) -> None:
        # The body has been read: the next message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    failed: list[APIError] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        try:
            result.append(await api.collect(gen, stops, logprobs))
        except APIError as err:  # raised outside the group, not wrapped in an ExceptionGroup
            failed.append(err)
        finally:
            tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not result:  # the client is gone: nobody reads an answer
        raise APIError(499, "the client closed the connection")
    return result[0]


async def _respond(
    request: Request,
    api: OpenAIServing,
    req: EngineRequest,
    stops: list[str],
    shape: ResponseShape,
    stream: bool,
) -> Response:
    """Submit `req`; answer with the whole response or an event stream."""
    logprobs = None
    if req.sampling.logprobs is not None:
        logprobs = LogprobsFormatter(shape.kind, api.model.codec)
    gen = await api.submit(req)
    if stream:
        events = api.stream(gen, stops, shape, logprobs)
        return _EventStream(events, media_type="text/event-stream")
    text, reason, num_tokens = await _collect_unless_gone(request, api, gen, stops, logprobs)
    whole = None if logprobs is None else logprobs.whole()
    return JSONResponse(shape.whole(text, reason, api.usage(gen, num_tokens), whole))


def build_app(host: EngineHost) -> FastAPI:
    """The app for `host`; its lifespan runs the host (load, serve, close)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.run)
            yield
            await host.stop()

    app = FastAPI(title="kvflow", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    started = int(time.time())

    def serving() -> OpenAIServing:
        if host.status is HostStatus.DRAINING:
            raise unavailable("the server is shutting down")
        if host.serving is None:
            raise unavailable(f"the server is {host.status} (not ready)")
        return host.serving

    @app.get("/health")
    async def health() -> Response:
        ok = host.status is HostStatus.SERVING
        return JSONResponse({"status": str(host.status)}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(host.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        served = host.serving.model if host.serving is not None else None
        if served is None:
            return ModelList(data=[])
        card = ModelCard(id=served.name, created=started, max_model_len=served.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        api = serving()
        api.check_common(body)
        prompt_ids = api.completion_prompt(body)
        asked = api.logprobs_asked(body)
        req = api.make_request(body, prompt_ids, body.max_tokens, "cmpl", asked)
        shape = ResponseShape("completion", req.request_id, api.model.name, body.include_usage)
        return await _respond(request, api, req, body.stop_strings, shape, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        api = serving()
        api.check_common(body)
        prompt_ids = api.chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        asked = api.logprobs_asked(body)
        req = api.make_request(body, prompt_ids, max_tokens, "chatcmpl", asked)
        shape = ResponseShape("chat", req.request_id, api.model.name, body.include_usage)
        return await _respond(request, api, req, body.stop_strings, shape, body.stream)

    return app


__all__ = ["build_app"]
