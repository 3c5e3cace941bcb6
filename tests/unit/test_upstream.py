"""The router's HTTP/1.1 pool to its instances, against a small real server on loopback:
keep-alive reuse, an idle connection the server closed, one it closed as the next
request came, a refused connection, a chunked body handed on as it arrives, a request
given up before its answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kvflow.cluster.upstream import UpstreamDownError, UpstreamPool
from tests.serve_process import free_port

REQUEST = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"


class _Server:
    """Answers each request by its path: /x a small body kept alive, /close one then
    closes, /drop none on a connection that served one before (it closes, as a server
    closing an idle connection when the next request comes) else as /x, /stream two
    chunks with `release` awaited between them, /cut a head and half a chunk, then
    closes, /hold nothing: it sets `dropped` once the client closed."""

    def __init__(self) -> None:
        self.num_connections = 0
        self.release = asyncio.Event()
        self.dropped = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        self.writers.append(writer)
        num_served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                if path == b"/stream":
                    writer.write(chunked + b"5\r\nfirst\r\n")
                    await writer.drain()
                    await self.release.wait()
                    writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
                elif path == b"/hold":
                    if not await reader.read(1):
                        self.dropped.set()
                    break
                elif path == b"/drop" and num_served:
                    break
                elif path == b"/cut":
                    writer.write(chunked + b"a\r\nhal")
                    await writer.drain()
                    break
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    if path == b"/close":
                        await writer.drain()
                        break
                await writer.drain()
                num_served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def _serving() -> AsyncIterator[tuple[_Server, int, UpstreamPool]]:
    """The server on a free port, and a pool to reach it (closed at the end)."""
    server = _Server()
    port = free_port()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
    pool = UpstreamPool(2.0)
    try:
        yield server, port, pool
    finally:
        pool.close()
        listener.close()
        for writer in server.writers:
            writer.close()


async def _body(pool: UpstreamPool, port: int, path: bytes = b"/x") -> bytes:
    response = await pool.request("127.0.0.1", port, REQUEST.replace(b"/x", path))
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    response.release()
    return b"".join(parts)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


def test_requests_reuse_a_kept_alive_connection() -> None:
    async def main() -> None:
        async with _serving() as (server, port, pool):
            assert [await _body(pool, port) for _ in range(3)] == [b"ok"] * 3
            assert server.num_connections == 1

    _run(main())


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def main() -> None:
        async with _serving() as (server, port, pool):
            assert await _body(pool, port, b"/close") == b"ok"
            await asyncio.sleep(0.05)  # the close reaches the pool's idle connection
            assert await _body(pool, port) == b"ok"
            assert server.num_connections == 2

    _run(main())


def test_a_kept_alive_connection_closed_unanswered_sends_the_request_again_on_a_new_one() -> None:
    async def main() -> None:
        async with _serving() as (server, port, pool):
            assert await _body(pool, port) == b"ok"
            assert await _body(pool, port, b"/drop") == b"ok"  # not a byte came back: again
            assert server.num_connections == 2

    _run(main())


def test_a_refused_connection_is_down() -> None:
    async def main() -> None:
        with pytest.raises(UpstreamDownError, match="cannot connect"):
            await UpstreamPool(2.0).request("127.0.0.1", free_port(), REQUEST)

    _run(main())


def test_a_chunk_is_handed_on_before_the_body_ends_and_a_cut_body_raises() -> None:
    async def main() -> None:
        async with _serving() as (server, port, pool):
            response = await pool.request("127.0.0.1", port, REQUEST.replace(b"/x", b"/stream"))
            assert response.status == 200
            assert await response.read() == b"first"  # the server holds the rest
            server.release.set()
            assert await response.read() == b"second"
            assert await response.read() == b""
            response.release()
            cut = await pool.request("127.0.0.1", port, REQUEST.replace(b"/x", b"/cut"))
            with pytest.raises(UpstreamDownError):
                while await cut.read():
                    pass
            cut.release()

    _run(main())


def test_a_request_given_up_before_its_answer_closes_its_connection() -> None:
    async def main() -> None:
        async with _serving() as (server, port, pool):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # as the router's prefill step gives up
                    await pool.request("127.0.0.1", port, REQUEST.replace(b"/x", b"/hold"))
            await asyncio.wait_for(server.dropped.wait(), 5)  # the instance sees it end
            assert await _body(pool, port) == b"ok"

    _run(main())
