"""The router process (`kvflow router`): an OpenAI-compatible front door over several
`kvflow serve` instances. Each request goes to the instance a registry `Router` picks
over the live fleet view (`kvflow.cluster.live`); the answer (streamed or not) passes
through as its bytes arrive (`kvflow.cluster.upstream`). A request the chosen instance
refuses (503) or cannot take (connection refused, closed before any answer) goes to
another instance; once an answer's first byte has been forwarded it is never retried. A
background loop (`kvflow.cluster.proxy_health`) checks each instance's /health and
scrapes its load and peer service off /metrics; instances that fail leave the rotation
until they answer 200 again. The router follows each instance's block events over its
peer service (`kvflow.peer.follow`).
With prefill instances (`--prefill`), each request is prefilled on one of them first
and handed to one of the others (`kvflow.cluster.proxy_pd`), both legs through
`RouterApp.send_routed`.

The app is plain ASGI (no framework per request): the forwarding path is the router's
whole cost, and on a machine shared with the instances every microsecond per streamed
chunk is one the instances do not get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from prometheus_client import generate_latest

from kvflow.cluster.live import LiveFleet, Ticket
from kvflow.cluster.proxy_health import InstanceWatch
from kvflow.cluster.proxy_metrics import RouterMetrics
from kvflow.cluster.proxy_pd import PrefillStep
from kvflow.cluster.proxy_routing import routing_request
from kvflow.cluster.upstream import UpstreamDownError, UpstreamPool, UpstreamResponse
from kvflow.engine_adapters.text import TextCodec
from kvflow.request import Request
from kvflow.serve.asgi import ClientGoneError, read_body
from kvflow.serve.limits import HTTPGuard, HTTPLimits, Receive, Send, error_body, reply

logger = logging.getLogger("kvflow.router")

Scope = dict[str, Any]

FORWARDED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Hop-by-hop headers are each side's own (a request's length too: the router sets it
# for the body it sends); uvicorn adds its own date and server to answers.
_DROPPED_REQUEST = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                              b"keep-alive", b"expect", b"upgrade"})  # fmt: skip
_DROPPED_RESPONSE = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"date",
                               b"server"})  # fmt: skip


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
    limits: HTTPLimits = field(default_factory=HTTPLimits)
    """API key, body size and requests in flight the router takes; its key also goes
    with its own requests to the instances (a fleet shares one key)."""


class _Instance:
    """Where the hot path sends to one instance, and its metrics, worked out once."""

    def __init__(self, url: str, metrics: RouterMetrics) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode()
        self.name_header = url.encode()
        self.in_flight = metrics.in_flight.labels(url)
        self.routed_2xx = metrics.routed.labels(url, "2xx")


class RouterApp:
    """The state behind the app: the live fleet and its router, the connections to the
    instances, the tasks that check them and follow their block events."""

    def __init__(self, options: RouterOptions, fleet: LiveFleet, codec: TextCodec) -> None:
        self.options = options
        self.fleet = fleet
        self.codec = codec
        self.metrics = RouterMetrics()
        self.metrics.info.labels(fleet.router.name).set(1)
        for i, inst in enumerate(fleet.instances):
            self.metrics.instance_info.labels(inst.url, str(i)).set(1)
        self.targets = [_Instance(inst.url, self.metrics) for inst in fleet.instances]
        self.pool = UpstreamPool(options.connect_timeout_s)
        self.client: httpx.AsyncClient | None = None
        """For health checks, scrapes and /v1/models (not the hot path)."""
        self.watch = InstanceWatch(fleet, self.metrics.healthy, options.health_interval_s)
        self.pd: PrefillStep | None = None
        if fleet.prefill_ids:
            self.pd = PrefillStep(self, options.prefill_timeout_s)

    def _http(self) -> httpx.AsyncClient:
        assert self.client is not None, "the app's lifespan has not started"
        return self.client

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The health loop, the follow tasks and the connections, for the app's life."""
        timeout = httpx.Timeout(self.options.health_timeout_s)
        key = self.options.limits.api_key
        auth = {"authorization": f"Bearer {key}"} if key is not None else None
        client = httpx.AsyncClient(timeout=timeout, headers=auth)
        async with client, anyio.create_task_group() as tg:
            self.client = client
            await self.watch.start(client, tg)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                self.pool.close()

    # -- forwarding --------------------------------------------------------------------
    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one POST to an instance, retrying elsewhere while nothing was sent,
        and pass its answer through."""
        arrived = time.perf_counter()
        try:
            raw = await read_body(receive)
        except ClientGoneError:
            return
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:
            await reply(
                send,
                400,
                error_body(f"the request body is not JSON: {err}", "invalid_request_error"),
            )
            return
        if not isinstance(body, dict):
            message = f"the request body must be a JSON object, got {raw[:80]!r}"
            await reply(send, 400, error_body(message, "invalid_request_error"))
            return
        path: str = scope["path"]
        routed = routing_request(path, body, self.codec)
        head = [b"POST ", scope.get("raw_path") or path.encode(), b" HTTP/1.1\r\n"]
        for name, value in scope["headers"]:
            if name not in _DROPPED_REQUEST:
                head += [name, b": ", value, b"\r\n"]
        if self.pd is None:
            sending = self.send_routed(routed, b"".join(head), raw, arrived)
        else:
            sending = self.pd.send(body, routed, b"".join(head), raw, arrived)
        # A client that leaves before the answer begins (a whole answer's head comes
        # when it is done) cancels the routing, here in this task (a task of its own
        # would start a loop turn later): the instance sees its request dropped.
        left = asyncio.create_task(_disconnected(receive))
        this = asyncio.current_task()
        assert this is not None
        routing = True

        def leave(_: object) -> None:
            if routing:
                this.cancel()

        left.add_done_callback(leave)
        try:
            try:
                sent = await sending
            except asyncio.CancelledError:
                if left.done() and not left.cancelled() and this.uncancel() == 0:
                    return  # the client left; routing settled what it started
                raise
            finally:
                routing = False
                left.remove_done_callback(leave)
            if isinstance(sent, str):
                self.metrics.unroutable.inc()
                await reply(send, 503, error_body(sent, "service_unavailable"))
                return
            ticket, target, response = sent
            await self._relay(response, ticket, target, left, send)
        finally:
            left.cancel()

    async def send_routed(
        self,
        routed: Request,
        head: bytes,
        raw: bytes,
        arrived: float,
        *,
        prefill: bool = False,
        tried: list[int] | None = None,
    ) -> tuple[Ticket, _Instance, UpstreamResponse] | str:
        """Send one request (`head`: its request line and headers without `host` and
        `content-length`; `raw`: its body; `arrived`: its `perf_counter` arrival) to
        the instance the router picks for `routed` (a prefill instance with `prefill`),
        and to another while the chosen one refuses it (503) or is down before
        answering. `tried` (appended to as it goes) lists instances not to choose.
        Returns the accepted answer with its ticket (settle it with `_done`), or why no
        instance took it. Cancelled (a caller's timeout), it settles what it started.
        The prefill leg of a request is not in `kvflow:router_added_latency_seconds`."""
        tried = [] if tried is None else tried
        fleet = self.fleet
        metrics = self.metrics
        failed: list[str] = []  # how each instance tried here failed the request
        while True:
            ticket = fleet.route(routed, tried, prefill)
            if ticket is None:
                return self._unroutable(failed, tried, prefill)
            i = ticket.instance
            tried.append(i)
            target = self.targets[i]
            data = b"".join(
                [head, b"content-length: %d\r\nhost: " % len(raw), target.host_header,
                 b"\r\n\r\n", raw]
            )  # fmt: skip
            target.in_flight.inc()
            sent = time.perf_counter()
            try:
                response = await self.pool.request(target.host, target.port, data)
            except UpstreamDownError as err:
                self._done(ticket)
                failed.append(f"{target.url} is down ({err})")
                metrics.retries.labels(target.url, "down").inc()
                logger.warning("kvflow router: %s failed a request (%s); retrying", target.url, err)
                self.watch.set_health(i, False, f"a request found it down: {err}")
                continue
            except BaseException:
                self._done(ticket)
                raise
            if response.status != 503:
                break
            try:
                with contextlib.suppress(UpstreamDownError):
                    while await response.read():
                        pass
            finally:
                response.release()
                self._done(ticket)
            failed.append(f"{target.url} refused it (503)")
            metrics.retries.labels(target.url, "refused").inc()
        fleet.accepted(ticket)
        if not prefill:
            metrics.added.observe(sent - arrived)
        if response.status // 100 == 2:
            target.routed_2xx.inc()
        else:
            metrics.routed.labels(target.url, f"{response.status // 100}xx").inc()
        return ticket, target, response

    def _unroutable(self, failed: list[str], tried: list[int], prefill: bool) -> str:
        """Why no instance took a request: how each one tried failed it, and which were
        out of the rotation (failing their health checks)."""
        fleet = self.fleet
        ids = fleet.prefill_ids if prefill else range(fleet.num_serving)
        kind = "prefill instances" if prefill else "instances"
        instances, reasons = fleet.instances, self.watch.reasons
        out = [i for i in ids if i not in tried and not instances[i].healthy]
        why = {i: f"{self.targets[i].url}: {reasons.get(i, 'not checked yet')}" for i in out}
        if not failed:
            return (
                f"no instance took the request: all {len(out)} {kind} are out of the "
                f"rotation ({'; '.join(why.values())})"
            )
        outs = [f"{self.targets[i].url} is out of the rotation" for i in out]
        return f"no instance took the request: {'; '.join(failed + outs)}"

    async def _relay(
        self,
        response: UpstreamResponse,
        ticket: Ticket,
        target: _Instance,
        left: asyncio.Task[None],
        send: Send,
    ) -> None:
        """Pass the answer through as its bytes arrive. The connection goes back (or
        closes) and the ticket is settled however sending ends: a client that leaves
        (`left` done) closes the instance's connection, so the instance aborts the
        request."""
        headers = [(n, v) for n, v in response.headers if n not in _DROPPED_RESPONSE]
        headers.append((b"x-kvflow-instance", target.name_header))

        def leave(_: object) -> None:
            response.abort()

        left.add_done_callback(leave)
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            first = True
            chunk = b""
            while not left.done():
                last = chunk
                try:
                    chunk = await response.read()
                except UpstreamDownError as err:
                    # Bytes went out already: no retry. The client is told.
                    if not left.done():
                        logger.warning(
                            "kvflow router: %s broke off a response (%s)", target.url, err
                        )
                        await self._broken_off(send, response, target, last, err)
                    return
                if first:
                    first = False
                    self.fleet.answered(ticket)
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            left.remove_done_callback(leave)
            response.release()
            self._done(ticket)

    @staticmethod
    async def _broken_off(
        send: Send, response: UpstreamResponse, target: _Instance, last: bytes, err: Exception
    ) -> None:
        """End an answer its instance broke off after the router passed bytes of it on.
        An event stream cut between events ends as vLLM ends one its engine failed: an
        error event naming the instance, then [DONE] (the openai client raises it).
        Anything else is left incomplete: the connection closes without the body's
        end, so the client sees it cut short (never a whole-looking answer)."""
        streamed = any(
            n == b"content-type" and v.startswith(b"text/event-stream") for n, v in response.headers
        )
        if streamed and (not last or last.endswith(b"\n\n")):
            message = f"instance {target.url} broke off the stream: {err}"
            error = error_body(message, "server_error", "instance_failed")
            event = b"data: " + error + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})

    def _done(self, ticket: Ticket) -> None:
        self.fleet.finished(ticket)
        self.targets[ticket.instance].in_flight.dec()

    # -- the other endpoints -------------------------------------------------------------
    async def models(self, send: Send) -> None:
        for inst in self.fleet.instances:
            if not inst.healthy:
                continue
            with contextlib.suppress(httpx.HTTPError):
                r = await self._http().get(f"{inst.url}/v1/models", timeout=5.0)
                await reply(send, r.status_code, r.content)
                return
        await reply(send, 503, error_body("no instance is in the rotation", "service_unavailable"))

    async def health(self, send: Send) -> None:
        status = {inst.url: inst.healthy for inst in self.fleet.instances}
        ok = any(inst.healthy for inst in self.fleet.serving)
        await reply(send, 200 if ok else 503, json.dumps({"instances": status}).encode())

    async def metrics_text(self, send: Send) -> None:
        peer_at = self.fleet.follower.peer_at
        directory = self.fleet.directory
        for inst in self.fleet.instances:
            peer_id = None if inst.peer is None else peer_at.get(inst.peer.address)
            held = 0 if peer_id is None else directory.num_held(peer_id)
            self.metrics.directory_keys.labels(inst.url).set(held)
        text = generate_latest(self.metrics.registry)
        await reply(send, 200, text, media_type=b"text/plain; version=0.0.4; charset=utf-8")


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (its body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class RouterASGI:
    """The ASGI app: the two forwarded POSTs, GET /v1/models, /health and /metrics;
    its lifespan runs the router's background work."""

    def __init__(self, state: RouterApp) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        state, path, method = self.state, scope["path"], scope["method"]
        if path in FORWARDED_PATHS and method == "POST":
            await state.forward(scope, receive, send)
        elif path in FORWARDED_PATHS or (path in _GETS and method != "GET"):
            await reply(send, 405, b'{"detail":"Method Not Allowed"}')
        elif path == "/health":
            await state.health(send)
        elif path == "/metrics":
            await state.metrics_text(send)
        elif path == "/v1/models":
            await state.models(send)
        else:
            await reply(send, 404, b'{"detail":"Not Found"}')

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        async with self.state.running():
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
        await send({"type": "lifespan.shutdown.complete"})


_GETS = frozenset({"/health", "/metrics", "/v1/models"})


def run_router(
    options: RouterOptions, fleet: LiveFleet, codec: TextCodec, host: str, port: int
) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes the responses in flight)."""
    import uvicorn

    from kvflow.serve.server import bind_listener

    app = HTTPGuard(RouterASGI(RouterApp(options, fleet, codec)), options.limits)
    sock = bind_listener(host, port)  # a port in use: a one-line error, before serving
    bound = sock.getsockname()[1]
    logger.info(
        "kvflow router: http://%s:%d over %d instances", host, bound, len(options.instances)
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["RouterASGI", "RouterApp", "RouterOptions", "run_router"]
