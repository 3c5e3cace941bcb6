"""The server's application: OpenAI's completions and chat completions endpoints (plain
ASGI, see `kvflow.serve.asgi`), and FastAPI for the models endpoint, /health, /metrics,
errors and the lifespan, around the engine an `EngineHost` runs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvflow.request import Request as EngineRequest
from kvflow.serve.asgi import (
    ASGIApp,
    ClientGoneError,
    FastRoutes,
    read_body,
    send_event_stream,
    send_json,
    unless_gone,
)
from kvflow.serve.errors import APIError, bad_request, describe_validation, install_error_handlers
from kvflow.serve.handoff import RequestHandoff, request_handoff
from kvflow.serve.host import EngineHost, HostStatus
from kvflow.serve.logprobs import LogprobsFormatter
from kvflow.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kvflow.serve.responses import ResponseShape, usage
from kvflow.serve.serving import Generation, OpenAIServing, unavailable

if TYPE_CHECKING:
    from kvflow.peer.node import PeerNode

BodyT = TypeVar("BodyT", CompletionRequest, ChatCompletionRequest)

CLIENT_GONE_STATUS = 499
"""The status (nginx's) a request is counted under in `request_rejected` when its client
left before its body arrived (no answer is sent)."""

Prepared = tuple[list[EngineRequest], list[str], ResponseShape, bool, RequestHandoff | None]
"""A generation request made ready: engine requests (one per choice), stop strings, the
response's shape, whether to stream, and its part in a prefill/decode handoff."""


def _parse(raw: bytes, model: type[BodyT]) -> BodyT:
    """The body as `model`; invalid JSON or fields are a 400 naming them."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        message, param = describe_validation(err.errors(include_url=False))
        raise bad_request(message, param) from None


def _prepare_completion(api: OpenAIServing, raw: bytes, node: PeerNode | None) -> Prepared:
    body = _parse(raw, CompletionRequest)
    api.check_common(body)
    prompts = api.completion_prompts(body)
    handoff = request_handoff(node, body, len(prompts))
    asked = api.logprobs_asked(body)
    reqs = [api.make_request(body, ids, body.max_tokens, "cmpl", asked) for ids in prompts]
    shape = ResponseShape("completion", reqs[0].request_id, api.model.name, body.include_usage)
    return reqs, body.stop_strings, shape, body.stream, handoff


def _prepare_chat(api: OpenAIServing, raw: bytes, node: PeerNode | None) -> Prepared:
    body = _parse(raw, ChatCompletionRequest)
    api.check_common(body)
    prompt_ids = api.chat_prompt(body)
    handoff = request_handoff(node, body, 1)
    max_tokens = body.max_completion_tokens or body.max_tokens
    asked = api.logprobs_asked(body)
    req = api.make_request(body, prompt_ids, max_tokens, "chatcmpl", asked)
    shape = ResponseShape("chat", req.request_id, api.model.name, body.include_usage)
    return [req], body.stop_strings, shape, body.stream, handoff


async def _collect_all(
    api: OpenAIServing,
    gens: Sequence[Generation],
    stops: list[str],
    formatters: Sequence[LogprobsFormatter | None],
) -> list[tuple[str, str, int]]:
    """`api.collect` of each generation, at once; one failing cancels the others (their
    requests are aborted) and its error is raised."""
    if len(gens) == 1:
        return [await api.collect(gens[0], stops, formatters[0])]
    results: dict[int, tuple[str, str, int]] = {}
    failed: list[APIError] = []

    async def one(i: int, scope: anyio.CancelScope) -> None:
        try:
            results[i] = await api.collect(gens[i], stops, formatters[i])
        except APIError as err:  # raised outside the group, not wrapped in an ExceptionGroup
            failed.append(err)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for i in range(len(gens)):
            tg.start_soon(one, i, tg.cancel_scope)
    if failed:
        raise failed[0]
    return [results[i] for i in range(len(gens))]


async def _submit_all(api: OpenAIServing, reqs: Sequence[EngineRequest]) -> list[Generation]:
    """Submit `reqs` (one per choice); if one is refused, the others are aborted."""
    gens: list[Generation] = []
    try:
        for req in reqs:
            gen = await api.submit(req)
            gens.append(gen)
    except BaseException:
        for gen in gens:
            await gen.aclose()
        raise
    return gens


def _generation_endpoint(
    host: EngineHost,
    serving: Callable[[], OpenAIServing],
    prepare: Callable[[OpenAIServing, bytes, PeerNode | None], Prepared],
) -> ASGIApp:
    """An ASGI endpoint (`asgi.FastRoutes` calls it for POSTs; FastAPI's routing for
    the rest, e.g. a 405): the whole response, or an event stream for one request. A
    handoff runs before the submission and adds its fields to a whole response."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            raw = await read_body(receive)
            api = serving()
            reqs, stops, shape, stream, handoff = prepare(api, raw, host.peer_node)
            if handoff is not None:
                await handoff.before_submit(reqs[0])
            formatters = [
                None
                if r.sampling.logprobs is None
                else LogprobsFormatter(shape.kind, api.model.codec)
                for r in reqs
            ]
            gens = await _submit_all(api, reqs)
        except APIError as err:  # rejected; a request submitted is counted when it ends
            host.metrics.requests.count_rejected(err.status)
            await send_json(send, err.status, err.body(), err.headers)
            return
        except ClientGoneError:
            host.metrics.requests.count_rejected(CLIENT_GONE_STATUS)
            return
        if stream:
            [gen] = gens
            await send_event_stream(receive, send, api.stream(gen, stops, shape, formatters[0]))
            return
        try:  # each collect leaves its generation (aborting it if unfinished)
            answered, results = await unless_gone(
                receive, _collect_all(api, gens, stops, formatters)
            )
        except APIError as err:
            await send_json(send, err.status, err.body(), err.headers)
            return
        if not answered:  # the client is gone: nobody reads an answer
            return
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
        await send_json(send, 200, body)

    return endpoint


class _ASGIRoute:
    """An ASGI app as a Starlette route's endpoint (a plain function would be called as
    a request handler instead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def build_app(host: EngineHost) -> ASGIApp:
    """The app for `host`; its lifespan runs the host (load, serve, close). The
    generation endpoints are plain ASGI in front of FastAPI (see `kvflow.serve.asgi`)."""

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

    generation = {
        "/v1/completions": _generation_endpoint(host, serving, _prepare_completion),
        "/v1/chat/completions": _generation_endpoint(host, serving, _prepare_chat),
    }
    for path, endpoint in generation.items():
        app.router.routes.append(Route(path, _ASGIRoute(endpoint), methods=["POST"]))
    return FastRoutes(app, generation)


__all__ = ["build_app"]
