"""The router process's app: an OpenAI-compatible front door over several `kvflow
serve` instances. Each request goes to the instance a `ProxyRouter` picks; responses
(streamed or not) pass through chunk by chunk as they arrive. A request the chosen
instance refuses (503) or cannot take (connection refused, reset before any answer)
goes to another instance; once an answer's first byte has been forwarded it is never
retried. A background loop checks each instance's /health and scrapes its load off
/metrics; instances that fail leave the rotation until they answer 200 again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from kvflow.cluster.proxy_pd import PrefillStep
from kvflow.cluster.proxy_routing import (
    CacheAware,
    InstanceState,
    ProxyRouter,
    ProxyView,
    create,
    request_info,
)

logger = logging.getLogger("kvflow.router")

# Hop-by-hop and length headers are the proxy's own to set.
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}
ADDED_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


@dataclass(frozen=True)
class RouterOptions:
    """How the router process runs."""

    instances: tuple[str, ...]
    """Base URLs of the instances (http://host:port)."""
    router: str = "cache-aware"
    health_interval_s: float = 0.5
    """Seconds between health checks and load scrapes of each instance."""
    health_timeout_s: float = 2.0
    """A health check or scrape slower than this fails it."""
    connect_timeout_s: float = 2.0
    """Connecting to an instance slower than this counts as down (retried elsewhere)."""
    prefill: tuple[str, ...] = ()
    """Base URLs of prefill instances: with any, each request is prefilled on one of them
    first and handed to one of `instances` (`kvflow.cluster.proxy_pd`)."""
    prefill_timeout_s: float = 60.0
    """A prefill step not answered within this time is given up (the decode instance
    then computes the prompt)."""


def _error(status: int, message: str) -> JSONResponse:
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter(
            "kvflow:router_requests",
            "Requests forwarded, per instance and status class of its answer.",
            ["instance", "status"],
            registry=r,
        )
        self.retries = Counter(
            "kvflow:router_retries",
            "Requests sent on to another instance, per instance that failed them and why.",
            ["instance", "reason"],
            registry=r,
        )
        self.unroutable = Counter(
            "kvflow:router_unroutable", "Requests answered 503: no instance took them.", registry=r
        )
        self.added = Histogram(
            "kvflow:router_added_latency_seconds",
            "Time from a request's arrival at the router to its sending to the instance "
            "that answered it (reading, parsing, routing and failed tries).",
            buckets=ADDED_LATENCY_BUCKETS,
            registry=r,
        )
        self.healthy = Gauge(
            "kvflow:router_instance_healthy", "1 while an instance is in the rotation.",
            ["instance"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "kvflow:router_in_flight", "Requests in flight per instance.", ["instance"],
            registry=r,
        )  # fmt: skip


class _Relay(StreamingResponse):
    """An instance's answer passed through chunk by chunk. The upstream response is
    closed and the in-flight count settled when sending ends, however it ends: also
    when the client left before the first chunk (a body generator never started would
    never run its own cleanup)."""

    def __init__(
        self,
        upstream: httpx.Response,
        on_done: Callable[[], None],
        status_code: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(self._chunks(upstream), status_code=status_code, headers=headers)
        self._upstream = upstream
        self._on_done = on_done

    @staticmethod
    async def _chunks(upstream: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as err:
            # Bytes went out already: the client sees the stream end (no retry).
            logger.warning("kvflow router: %s broke off a response (%s)", upstream.url, err)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            self._on_done()


class RouterApp:
    """The state behind the app: instances, the router plugin, the HTTP client."""

    def __init__(self, options: RouterOptions, router: ProxyRouter) -> None:
        self.options = options
        self.router = router
        urls = options.instances + options.prefill
        self.instances = [InstanceState(url.rstrip("/")) for url in urls]
        self.metrics = _Metrics()
        self.client: httpx.AsyncClient | None = None
        self.pd: PrefillStep | None = None
        if options.prefill:
            ids = range(len(options.instances), len(urls))
            self.pd = PrefillStep(self, ids, create(options.router), options.prefill_timeout_s)

    def _http(self) -> httpx.AsyncClient:
        assert self.client is not None, "the app's lifespan has not started"
        return self.client

    async def check(self, i: int) -> None:
        """One health check of instance i and, when healthy, a scrape of its load."""
        inst = self.instances[i]
        client = self._http()
        timeout = self.options.health_timeout_s
        try:
            health = await client.get(f"{inst.url}/health", timeout=timeout)
            healthy = health.status_code == 200
            if healthy:
                text = (await client.get(f"{inst.url}/metrics", timeout=timeout)).text
                running = waiting = 0.0
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "kvflow:num_requests_running":
                            running += s.value
                        elif s.name == "kvflow:num_requests_waiting":
                            waiting += s.value
                inst.num_running, inst.num_waiting = int(running), int(waiting)
        except (httpx.HTTPError, ValueError):
            healthy = False
        self._set_health(i, healthy)

    def _set_health(self, i: int, healthy: bool) -> None:
        inst = self.instances[i]
        if inst.healthy and not healthy:
            logger.warning("kvflow router: %s left the rotation", inst.url)
            if isinstance(self.router, CacheAware):
                self.router.forget(i)  # a restarted instance comes back empty
        elif healthy and not inst.healthy:
            logger.info("kvflow router: %s is in the rotation", inst.url)
        inst.healthy = healthy
        self.metrics.healthy.labels(inst.url).set(1 if healthy else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in range(len(self.instances))))

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await self.check_all()

    async def forward(self, request: Request) -> Response:
        """Route one POST to an instance, retrying elsewhere while nothing was sent."""
        arrived = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as err:
            return _error(400, f"the request body is not JSON: {err}")
        if not isinstance(body, dict):
            return _error(400, f"the request body must be a JSON object, got {raw[:80]!r}")
        path = request.url.path
        info = request_info(path, body)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROPPED_HEADERS and k.lower() != "host"
        }
        if self.pd is not None:
            handed, prefill_s = await self.pd.handoff(path, body, headers, info)
            raw = handed or raw
            arrived += prefill_s
        tried: list[int] = []
        client = self._http()
        serving = self.instances[: len(self.options.instances)]  # not the prefill ones
        while True:
            view = ProxyView(
                self.instances,
                [i for i, inst in enumerate(serving) if inst.healthy and i not in tried],
            )
            if not view.candidates:
                self.metrics.unroutable.inc()
                return _error(503, f"no instance took the request (tried {len(tried)})")
            i = self.router.route(info, view)
            tried.append(i)
            inst = self.instances[i]
            upstream = client.build_request(
                "POST", f"{inst.url}{path}", content=raw, headers=headers
            )
            inst.in_flight += 1
            self.metrics.in_flight.labels(inst.url).inc()
            sent = time.perf_counter()
            try:
                response = await client.send(upstream, stream=True)
            except httpx.TransportError as err:
                self._done(inst)
                self.metrics.retries.labels(inst.url, "down").inc()
                logger.warning("kvflow router: %s failed a request (%s); retrying", inst.url, err)
                self._set_health(i, False)
                continue
            if response.status_code == 503:
                await response.aclose()
                self._done(inst)
                self.metrics.retries.labels(inst.url, "refused").inc()
                continue
            break
        inst.num_routed += 1
        if response.status_code < 400:
            self.router.routed(info, i)
        self.metrics.routed.labels(inst.url, f"{response.status_code // 100}xx").inc()
        self.metrics.added.observe(sent - arrived)
        out_headers = {
            k: v for k, v in response.headers.items() if k.lower() not in _DROPPED_HEADERS
        }
        out_headers["x-kvflow-instance"] = inst.url
        return _Relay(
            response,
            lambda: self._done(inst),
            status_code=response.status_code,
            headers=out_headers,
        )

    def _done(self, inst: InstanceState) -> None:
        inst.in_flight -= 1
        self.metrics.in_flight.labels(inst.url).dec()

    async def models(self) -> Response:
        for inst in self.instances:
            if not inst.healthy:
                continue
            with contextlib.suppress(httpx.HTTPError):
                r = await self._http().get(f"{inst.url}/v1/models", timeout=5.0)
                return Response(r.content, r.status_code, media_type="application/json")
        return _error(503, "no instance is in the rotation")


def build_router_app(state: RouterApp) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(None, connect=state.options.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            state.client = client
            await state.check_all()
            watcher = asyncio.create_task(state.watch())
            try:
                yield
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    app = FastAPI(title="kvflow router", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        status = {inst.url: inst.healthy for inst in state.instances}
        ok = any(status.values())
        return JSONResponse({"instances": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type="text/plain")

    @app.get("/v1/models")
    async def models() -> Response:
        return await state.models()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await state.forward(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state.forward(request)

    return app


def run_router(options: RouterOptions, router: ProxyRouter, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes the responses in flight)."""
    import uvicorn

    app = build_router_app(RouterApp(options, router))
    logger.info("kvflow router: http://%s:%d over %d instances", host, port, len(options.instances))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = ["RouterApp", "RouterOptions", "build_router_app", "run_router"]
