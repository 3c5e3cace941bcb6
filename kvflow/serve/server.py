"""Run the app under uvicorn (uvloop when installed), with kvflow's shutdown: on SIGTERM
or SIGINT the server stops accepting connections, /health turns 503, requests in flight
drain (or are aborted, by `on_close`), and `serve` returns instead of re-raising the
signal, so the process exits 0."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from types import FrameType

import uvicorn

from kvflow.serve.app import build_app
from kvflow.serve.host import EngineHost, HostStatus, ServeOptions
from kvflow.serve.limits import HTTPGuard, HTTPLimits

logger = logging.getLogger("kvflow.serve")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, host: EngineHost) -> None:
        super().__init__(config)
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.host.status is HostStatus.FAILED:
            return True  # the model did not load: stop (the CLI reports it)
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler records the signal to re-raise it after shutdown, which
        # would end the process by the signal; a server asked to stop exits 0.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        if self._loop is not None:  # in the loop's thread, not inside this handler
            self._loop.call_soon_threadsafe(self.host.begin_draining)


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (the first address `host` resolves to), for
    uvicorn to listen on: binding here, before the server starts, makes a port in use
    or a host that does not resolve a one-line error.

    Raises:
        OSError: naming the host and port, with the reason.
    """
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
    except OSError as err:
        if sock is not None:
            sock.close()
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror or err
        raise OSError(f"cannot listen on --host {host} --port {port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    options: ServeOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: HTTPLimits | None = None,
) -> EngineHost:
    """Serve until SIGTERM/SIGINT, checking `limits` (API key, body size, requests in
    flight) before any handler; a request they refuse is counted in
    `request_rejected_total` as the app counts its own. Returns the host (its `failure`
    says whether the model failed to load).

    Raises:
        OSError: `host`:`port` cannot be bound (`bind_listener`), before anything loads.
    """
    engine_host = EngineHost(options)
    counted = engine_host.metrics.requests.count_rejected
    app = HTTPGuard(build_app(engine_host), limits or HTTPLimits(), counted)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",  # uvloop when installed
        http="auto",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=None,
    )
    server = _Server(config, engine_host)
    sock = bind_listener(host, port)
    bound = sock.getsockname()[1]
    logger.info("kvflow serve: http://%s:%d (model %r)", host, bound, options.model_name)
    server.run(sockets=[sock])
    return engine_host


__all__ = ["bind_listener", "serve"]
