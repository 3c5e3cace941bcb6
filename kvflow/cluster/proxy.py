"""The router process's app: an OpenAI-compatible front door over several `kvflow
serve` instances. Each request goes to the instance a registry `Router` picks over the
live fleet view (`kvflow.cluster.live`); responses (streamed or not) pass through chunk
by chunk as they arrive. A request the chosen instance refuses (503) or cannot take
(connection refused, reset before any answer) goes to another instance; once an
answer's first byte has been forwarded it is never retried. A background loop checks
each instance's /health and scrapes its load and peer service off /metrics; instances
that fail leave the rotation until they answer 200 again. The router follows each
instance's block events over its peer service (`kvflow.peer.follow`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from kvflow.cluster.live import LiveFleet, PeerInfo, Ticket
from kvflow.cluster.proxy_pd import PrefillStep
from kvflow.cluster.proxy_routing import routing_request
from kvflow.peer.follow import PeerAddress
from kvflow.serve.text import TextCodec

logger = logging.getLogger("kvflow.router")

# Hop-by-hop and length headers are the proxy's own to set.
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}
ADDED_LATENCY_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip


@dataclass(frozen=True)
class RouterOptions:
    """How the router process runs."""

    instances: tuple[str, ...]
    """Base URLs of the instances (http://host:port)."""
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
        self.info = Gauge("kvflow:router_info", "The router deciding (1).", ["router"], registry=r)
        self.instance_info = Gauge(
            "kvflow:router_instance_info",
            "The instances, numbered as the router's fleet view numbers them (1).",
            ["instance", "index"],
            registry=r,
        )
        self.directory_keys = Gauge(
            "kvflow:router_directory_keys",
            "Block keys the router's peer directory says an instance holds (from its "
            "block events).",
            ["instance"],
            registry=r,
        )


class _Relay(StreamingResponse):
    """An instance's answer passed through chunk by chunk. The upstream response is
    closed and the request's ticket settled when sending ends, however it ends: also
    when the client left before the first chunk (a body generator never started would
    never run its own cleanup)."""

    def __init__(
        self,
        upstream: httpx.Response,
        on_first: Callable[[], None],
        on_done: Callable[[], None],
        status_code: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(self._chunks(upstream, on_first), status_code=status_code, headers=headers)
        self._upstream = upstream
        self._on_done = on_done

    @staticmethod
    async def _chunks(
        upstream: httpx.Response, on_first: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        try:
            chunks = upstream.aiter_raw()
            async for chunk in chunks:
                on_first()
                yield chunk
                break
            async for chunk in chunks:
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


def _scrape(text: str) -> tuple[int, int, PeerInfo | None]:
    """Running requests, KV capacity in blocks (all tiers) and the peer service of an
    instance's /metrics text."""
    running = capacity = 0.0
    peer = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kvflow:num_requests_running":
                running += s.value
            elif s.name == "kvflow:kv_blocks_total":
                capacity += s.value
            elif s.name == "kvflow:peer_service_info":
                labels = s.labels
                peer = PeerInfo(
                    labels["peer_id"],
                    PeerAddress(labels["host"], int(labels["port"])),
                    bytes.fromhex(labels["fingerprint"]),
                    int(labels["block_size"]),
                )
    return int(running), int(capacity), peer


class RouterApp:
    """The state behind the app: the live fleet and its router, the HTTP client, the
    tasks following the instances' block events."""

    def __init__(self, options: RouterOptions, fleet: LiveFleet, codec: TextCodec) -> None:
        self.options = options
        self.fleet = fleet
        self.codec = codec
        self.metrics = _Metrics()
        self.metrics.info.labels(fleet.router.name).set(1)
        for i, inst in enumerate(fleet.instances):
            self.metrics.instance_info.labels(inst.url, str(i)).set(1)
        self.client: httpx.AsyncClient | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._follows: dict[int, tuple[PeerInfo, anyio.CancelScope]] = {}
        self._warned_block_size: set[int] = set()
        self.pd: PrefillStep | None = None
        if fleet.prefill_ids:
            self.pd = PrefillStep(self, options.prefill_timeout_s)

    @property
    def instances(self) -> list[str]:
        return [inst.url for inst in self.fleet.instances]

    def _http(self) -> httpx.AsyncClient:
        assert self.client is not None, "the app's lifespan has not started"
        return self.client

    async def check(self, i: int) -> None:
        """One health check of instance i and, when healthy, a scrape of its load and
        peer service (followed from then on)."""
        url = self.fleet.instances[i].url
        client = self._http()
        timeout = self.options.health_timeout_s
        try:
            health = await client.get(f"{url}/health", timeout=timeout)
            healthy = health.status_code == 200
            if healthy:
                text = (await client.get(f"{url}/metrics", timeout=timeout)).text
                running, capacity, peer = _scrape(text)
                self.fleet.scraped(i, running, capacity, peer)
                self._follow(i)
        except (httpx.HTTPError, ValueError, KeyError):
            healthy = False
        self._set_health(i, healthy)

    def _follow(self, i: int) -> None:
        """Follow instance i's block events (again, when its peer service changed)."""
        peer = self.fleet.instances[i].peer
        if peer is None or self._tg is None:
            return
        if peer.block_size != self.fleet.block_size:
            if i not in self._warned_block_size:
                self._warned_block_size.add(i)
                logger.warning(
                    "kvflow router: %s has kv.block_size=%d, the router %d: its blocks "
                    "are not followed (give the router the instances' --config/--set)",
                    self.fleet.instances[i].url, peer.block_size, self.fleet.block_size,
                )  # fmt: skip
            return
        known = self._follows.get(i)
        if known is not None:
            if known[0][1:] == peer[1:]:
                return
            known[1].cancel()
        scope = anyio.CancelScope()
        self._follows[i] = (peer, scope)
        self._tg.start_soon(self._run_follow, scope, peer)

    async def _run_follow(self, scope: anyio.CancelScope, peer: PeerInfo) -> None:
        with scope:
            await self.fleet.follower.maintain(peer.address, self.fleet.identity(peer.fingerprint))

    def _set_health(self, i: int, healthy: bool) -> None:
        inst = self.fleet.instances[i]
        if inst.healthy and not healthy:
            logger.warning("kvflow router: %s left the rotation", inst.url)
        elif healthy and not inst.healthy:
            logger.info("kvflow router: %s is in the rotation", inst.url)
        inst.healthy = healthy
        self.metrics.healthy.labels(inst.url).set(1 if healthy else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in range(len(self.fleet.instances))))

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await self.check_all()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The HTTP client, the health loop and the follow tasks, for the app's life."""
        timeout = httpx.Timeout(None, connect=self.options.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits) as client,
            anyio.create_task_group() as tg,
        ):
            self.client, self._tg = client, tg
            tg.start_soon(self.fleet.follower.expire_loop)
            await self.check_all()
            tg.start_soon(self.watch)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                self._tg = None

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
        routed = routing_request(path, body, self.codec)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROPPED_HEADERS and k.lower() != "host"
        }
        if self.pd is not None:
            handed, prefill_s = await self.pd.handoff(path, body, headers, routed)
            raw = handed or raw
            arrived += prefill_s
        tried: list[int] = []
        client = self._http()
        fleet = self.fleet
        while True:
            ticket = fleet.route(routed, tried)
            if ticket is None:
                self.metrics.unroutable.inc()
                return _error(503, f"no instance took the request (tried {len(tried)})")
            i = ticket.instance
            tried.append(i)
            url = fleet.instances[i].url
            upstream = client.build_request("POST", f"{url}{path}", content=raw, headers=headers)
            self.metrics.in_flight.labels(url).inc()
            sent = time.perf_counter()
            try:
                response = await client.send(upstream, stream=True)
            except httpx.TransportError as err:
                self._done(ticket)
                self.metrics.retries.labels(url, "down").inc()
                logger.warning("kvflow router: %s failed a request (%s); retrying", url, err)
                self._set_health(i, False)
                continue
            if response.status_code == 503:
                await response.aclose()
                self._done(ticket)
                self.metrics.retries.labels(url, "refused").inc()
                continue
            break
        fleet.accepted(ticket)
        self.metrics.routed.labels(url, f"{response.status_code // 100}xx").inc()
        self.metrics.added.observe(sent - arrived)
        out_headers = {
            k: v for k, v in response.headers.items() if k.lower() not in _DROPPED_HEADERS
        }
        out_headers["x-kvflow-instance"] = url
        return _Relay(
            response,
            lambda: fleet.answered(ticket),
            lambda: self._done(ticket),
            status_code=response.status_code,
            headers=out_headers,
        )

    def _done(self, ticket: Ticket) -> None:
        self.fleet.finished(ticket)
        self.metrics.in_flight.labels(self.fleet.instances[ticket.instance].url).dec()

    async def models(self) -> Response:
        for inst in self.fleet.instances:
            if not inst.healthy:
                continue
            with contextlib.suppress(httpx.HTTPError):
                r = await self._http().get(f"{inst.url}/v1/models", timeout=5.0)
                return Response(r.content, r.status_code, media_type="application/json")
        return _error(503, "no instance is in the rotation")

    def refresh_gauges(self) -> None:
        peer_at = self.fleet.follower.peer_at
        directory = self.fleet.directory
        for inst in self.fleet.instances:
            peer_id = None if inst.peer is None else peer_at.get(inst.peer.address)
            held = 0 if peer_id is None else directory.num_held(peer_id)
            self.metrics.directory_keys.labels(inst.url).set(held)


def build_router_app(state: RouterApp) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with state.running():
            yield

    app = FastAPI(title="kvflow router", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        status = {inst.url: inst.healthy for inst in state.fleet.instances}
        ok = any(inst.healthy for inst in state.fleet.serving)
        return JSONResponse({"instances": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.refresh_gauges()
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


def run_router(
    options: RouterOptions, fleet: LiveFleet, codec: TextCodec, host: str, port: int
) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes the responses in flight)."""
    import uvicorn

    app = build_router_app(RouterApp(options, fleet, codec))
    logger.info("kvflow router: http://%s:%d over %d instances", host, port, len(options.instances))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = ["RouterApp", "RouterOptions", "build_router_app", "run_router"]
