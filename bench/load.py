"""A lean keep-alive load client for small GETs: what the bench asks with, not measures.

Owns the client side of the small-GET rows: one asyncio protocol per connection, the
request bytes built once, a response read as far as its Content-Length. An aiohttp
client spends ~200 µs of CPU per request, about what the servers under test spend, so
at 64 connections it, not the server, set the pace. This one spends a fraction of
that. Answers with chunked framing are refused (every server here sends a length).
Must not be imported by `proxy` or run as a test.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

HEAD_END = b"\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange()` sends the request and awaits the answer."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None
        self._closed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = exc or ConnectionError("the server closed the connection")
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(self._closed)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        answer = self._answer
        if answer is None or answer.done():
            return
        end = self._buffer.find(HEAD_END)
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        length = _content_length(head)
        if length is None:
            answer.set_exception(RuntimeError("an answer without a Content-Length"))
            return
        total = end + len(HEAD_END) + length
        if len(self._buffer) < total:
            return
        body = bytes(self._buffer[end + len(HEAD_END) : total])
        del self._buffer[:total]
        answer.set_result((int(head[9:12]), body))

    async def exchange(self) -> tuple[int, bytes]:
        if self._closed is not None or self._transport is None:
            raise ConnectionError("the connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(self._request)
        return await self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _content_length(head: bytes) -> int | None:
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return None
    start += len(b"\r\ncontent-length:")
    stop = head.find(b"\r\n", start)
    return int(head[start : stop if stop >= 0 else len(head)])


async def gets(
    url: str, connections: int, seconds: float, expected: bytes
) -> tuple[list[float], float]:
    """GET `url` over `connections` keep-alive connections for `seconds`.

    Returns each request's latency (s) and the time taken; fails on a status other
    than 200 or a body other than `expected`.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\nUser-Agent: pleo-bench\r\nAccept: */*\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    opened = [
        (await loop.create_connection(lambda: _Connection(request), host, port))[1]
        for _ in range(connections)
    ]
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(connection: _Connection) -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, body = await connection.exchange()
            if status != 200 or body != expected:
                raise RuntimeError(f"GET {url}: status {status}, {len(body)} bytes")
            latencies.append(time.perf_counter() - sent)

    try:
        await asyncio.gather(*(worker(connection) for connection in opened))
        return latencies, time.perf_counter() - started
    finally:
        for connection in opened:
            connection.close()
