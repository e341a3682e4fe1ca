"""Test support: upstream stand-ins for the Pleo API and a dead port.

`run_echo_upstream()` is a real server on a loopback port 0 that records every request
it receives (method, raw target, raw headers, body) and answers with them as JSON,
unless a test sets `respond` (like oauth2-proxy's `testHTTPUpstream`). `dead_port()`
holds a bound, non-listening socket: connecting to it is refused, reliably.
`python -m tests.upstreams` runs the bulk upstream (large streamed downloads and
uploads, the sandbox's API shape) in its own process, printing `LISTENING <port>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

Responder = Callable[[web.Request, "Seen"], Awaitable[web.StreamResponse]]

# Not a power of two, so a dropped or duplicated chunk shifts every later byte.
PATTERN = random.Random(20240501).randbytes(65521)


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class EchoUpstream:
    """A recording upstream; set `respond` to change how it answers."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    respond: Responder | None = None
    # Set when a handler is cancelled: the proxy dropped the upstream connection.
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def hits(self) -> int:
        return len(self.seen)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(
            method=request.method,
            raw_path=request.raw_path,
            raw_headers=tuple(request.raw_headers),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=await request.read(),
        )
        self.seen.append(seen)
        try:
            if self.respond is not None:
                return await self.respond(request, seen)
            return web.json_response(echo_json(seen))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def echo_json(seen: Seen) -> dict[str, object]:
    return {
        "method": seen.method,
        "raw_path": seen.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in seen.raw_headers],
        "body_sha256": hashlib.sha256(seen.body).hexdigest(),
        "body_length": len(seen.body),
    }


@asynccontextmanager
async def run_echo_upstream() -> AsyncIterator[EchoUpstream]:
    """Start an EchoUpstream on 127.0.0.1, port 0; closed on exit."""
    upstream = EchoUpstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=0, handler_cancellation=True)
    await server.start_server()
    try:
        upstream.url = str(server.make_url("")).rstrip("/")
        yield upstream
    finally:
        await server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[EchoUpstream]:
    """An echo upstream for one test (import it: `from tests.upstreams import upstream`)."""
    async with run_echo_upstream() as echo:
        yield echo


@contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the context is open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: SYN → RST
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def pattern_chunks(size: int) -> Iterator[bytes]:
    """`size` bytes of PATTERN repeated, in pattern-sized pieces."""
    left = size
    while left > 0:
        piece = PATTERN[: min(left, len(PATTERN))]
        left -= len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_chunks(size):
        digest.update(piece)
    return digest.hexdigest()


async def _attachment(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    for piece in pattern_chunks(size):
        await response.write(piece)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        length += len(chunk)
    return web.json_response({"sha256": digest.hexdigest(), "length": length})


def bulk_app() -> web.Application:
    """The sandbox's bulk endpoints: streamed `/v1/attachments/{size}`, `POST /v1/uploads`."""
    app = web.Application()
    app.router.add_get("/v1/attachments/{size:\\d+}", _attachment)
    app.router.add_post("/v1/uploads", _upload)
    return app


async def _serve_bulk() -> None:
    runner = web.AppRunner(bulk_app())
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(f"LISTENING {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()  # until the parent terminates us
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(_serve_bulk())
    except KeyboardInterrupt:
        sys.exit(0)
