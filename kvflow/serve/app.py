"""The FastAPI application: OpenAI's completions, chat completions and models endpoints,
/health and /metrics, around the engine an `EngineHost` runs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
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
from kvflow.serve.handoff import RequestHandoff, request_handoff
from kvflow.serve.host import EngineHost, HostStatus
from kvflow.serve.logprobs import LogprobsFormatter
from kvflow.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kvflow.serve.responses import ResponseShape, usage
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
    gens: Sequence[Generation],
    stops: list[str],
    formatters: Sequence[LogprobsFormatter | None],
) -> list[tuple[str, str, int]]:
    """`api.collect` of each generation at once, all cancelled (aborting their
    requests) when the client disconnects or one of them fails."""
    results: dict[int, tuple[str, str, int]] = {}
    failed: list[APIError] = []

    async def watch(scope: anyio.CancelScope) -> None:
        # The body has been read: the next message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def one(i: int, scope: anyio.CancelScope) -> None:
        try:
            results[i] = await api.collect(gens[i], stops, formatters[i])
        except APIError as err:  # raised outside the group, not wrapped in an ExceptionGroup
            failed.append(err)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        async with anyio.create_task_group() as collecting:
            for i in range(len(gens)):
                collecting.start_soon(one, i, tg.cancel_scope)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if len(results) < len(gens):  # the client is gone: nobody reads an answer
        raise APIError(499, "the client closed the connection")
    return [results[i] for i in range(len(gens))]


async def _respond(
    request: Request,
    api: OpenAIServing,
    reqs: Sequence[EngineRequest],
    stops: list[str],
    shape: ResponseShape,
    stream: bool,
    handoff: RequestHandoff | None = None,
) -> Response:
    """Submit `reqs` (one per choice); answer with the whole response or, for one
    request, an event stream. A `handoff` runs before the submission and adds its
    fields to a whole response."""
    if handoff is not None:
        await handoff.before_submit(reqs[0])
    formatters = [
        None if r.sampling.logprobs is None else LogprobsFormatter(shape.kind, api.model.codec)
        for r in reqs
    ]
    gens: list[Generation] = []
    try:
        for req in reqs:
            gen = await api.submit(req)
            gens.append(gen)
    except BaseException:
        for gen in gens:  # the batch's earlier requests are aborted
            await gen.aclose()
        raise
    if stream:
        [gen] = gens
        events = api.stream(gen, stops, shape, formatters[0])
        return _EventStream(events, media_type="text/event-stream")
    results = await _collect_unless_gone(request, api, gens, stops, formatters)
    choices = [
        (text, reason, None if f is None else f.whole())
        for (text, reason, _), f in zip(results, formatters, strict=True)
    ]
    num_prompt = sum(len(g.request.prompt_token_ids) for g in gens)
    num_cached = sum(g.first.num_cached_tokens for g in gens)
    total = usage(num_prompt, sum(n for _, _, n in results), num_cached)
    body = shape.whole(choices, total)
    if handoff is not None:
        body.update(handoff.response_fields(gens))
    return JSONResponse(body)


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
        body = {"status": str(host.status), "role": host.options.role}
        return JSONResponse(body, status_code=200 if ok else 503)

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
        prompts = api.completion_prompts(body)
        handoff = request_handoff(host.peer_node, body, len(prompts))
        asked = api.logprobs_asked(body)
        reqs = [api.make_request(body, ids, body.max_tokens, "cmpl", asked) for ids in prompts]
        shape = ResponseShape("completion", reqs[0].request_id, api.model.name, body.include_usage)
        return await _respond(request, api, reqs, body.stop_strings, shape, body.stream, handoff)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        api = serving()
        api.check_common(body)
        prompt_ids = api.chat_prompt(body)
        handoff = request_handoff(host.peer_node, body, 1)
        max_tokens = body.max_completion_tokens or body.max_tokens
        asked = api.logprobs_asked(body)
        req = api.make_request(body, prompt_ids, max_tokens, "chatcmpl", asked)
        shape = ResponseShape("chat", req.request_id, api.model.name, body.include_usage)
        return await _respond(request, api, [req], body.stop_strings, shape, body.stream, handoff)

    return app


__all__ = ["build_app"]
