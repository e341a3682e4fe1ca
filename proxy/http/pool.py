"""The forwarder's upstream client: keep-alive HTTP/1.1 connections to the one API origin.

Why not `ClientSession` for this: a profile of small GETs (bench/profile.py) put about a
quarter of the proxy's CPU in its request machinery (URL joining, cookies, tracing,
redirect handling, the connector's per-host bookkeeping, two objects per exchange),
none of which relaying to one fixed origin needs. What stays aiohttp's, and so keeps
its behaviour: the connection protocol with its response parser, flow control and
read timeout (`aiohttp.client_proto.ResponseHandler`), and the request writer with its
header serialisation, which refuses CR/LF in names and values (`StreamWriter`). Those
are aiohttp internals, not its documented API: tests/http/test_pool.py and the forwarding
tests pin what we rely on.

Owns the idle connections (most recently used first, closed after
`UPSTREAM_KEEPALIVE_SECONDS`), request framing (Host, Content-Length or chunked), the
upload running beside the response read (Pleo may answer before reading all of it),
interim 1xx answers skipped, and the one resend of an idempotent, kept request whose
reused connection turned out closed (RFC 9112 §9.3.1, as aiohttp does). Connection
errors become `UpstreamError`s here. Must not retry otherwise, decompress, follow
redirects or connect anywhere but the configured API origin. The environment proxy
(HTTPS_PROXY) path keeps aiohttp's full client (proxy.http.upstream).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import ClientBodyTimeout, UpstreamConnectTimeout, UpstreamUnreachable
from proxy.http.body import Body

UPSTREAM_KEEPALIVE_SECONDS = 30.0
READ_BUFSIZE = 2**16  # aiohttp's default: the parser's chunk and flow-control unit
INLINE_BODY_BYTES = 2**16  # written before reading; a larger body is sent beside the read
# RFC 9110 §9.2.2; a kept body can be sent again, a streamed one cannot.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Like aiohttp: other methods without a body say so with Content-Length: 0.
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# A reused connection Pleo closed meanwhile fails with one of these before any answer.
StaleConnection = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
)


class Answer:
    """Pleo's answer as the forwarder reads it (the parts of ClientResponse it uses)."""

    def __init__(
        self,
        pool: UpstreamPool,
        protocol: ResponseHandler,
        message: Any,
        content: aiohttp.StreamReader,
        upload: asyncio.Task[None] | None,
    ) -> None:
        self._pool = pool
        self._protocol: ResponseHandler | None = protocol
        self._upload = upload
        self.status: int = message.code
        self.reason: str | None = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        self.content = content

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool when reusable."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()  # Pleo answered before taking the whole body
            protocol.close()
            return
        self._pool.give_back(protocol)

    def close(self) -> None:
        """Drop the answer unread: its connection is closed, never reused."""
        protocol, self._protocol = self._protocol, None
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()
        if protocol is not None:
            protocol.close()


class UpstreamPool:
    """Connections to `api_url`'s origin; `send()` is one exchange on one of them."""

    def __init__(
        self,
        api_url: str,
        ssl_context: ssl.SSLContext,
        *,
        keepalive: float = UPSTREAM_KEEPALIVE_SECONDS,
    ) -> None:
        url = URL(api_url)
        if url.host is None or url.port is None:
            raise ValueError("the API URL names no host")
        self._host = url.host
        self._port = url.port
        self._ssl = ssl_context if url.scheme == "https" else None
        # As aiohttp writes it: the default port left out, IPv6 literals bracketed.
        self._host_header = url.raw_authority.rpartition("@")[2]
        self._keepalive = keepalive
        self._idle: collections.deque[tuple[ResponseHandler, float]] = collections.deque()
        self._prune_handle: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Body,
        timeouts: aiohttp.ClientTimeout,
    ) -> Answer:
        """Send the request and read Pleo's status line and headers (not the body)."""
        resend = method in IDEMPOTENT_METHODS and body.replayable
        wire = self._framed(method, headers, body)
        while True:
            protocol, reused = await self._connection(timeouts.sock_connect)
            try:
                return await self._exchange(protocol, method, url, wire, body, timeouts)
            except StaleConnection:
                protocol.close()
                if not (reused and resend):
                    raise
                resend = False  # once: a second failure is Pleo's, not a stale socket
            except BaseException:
                protocol.close()
                raise

    def give_back(self, protocol: ResponseHandler) -> None:
        if self._closed or protocol.should_close or not protocol.is_connected():
            protocol.close()
            return
        loop = asyncio.get_running_loop()
        self._idle.append((protocol, loop.time()))
        if self._prune_handle is None:
            self._prune_handle = loop.call_later(self._keepalive, self._prune)

    async def close(self) -> None:
        self._closed = True
        if self._prune_handle is not None:
            self._prune_handle.cancel()
        while self._idle:
            self._idle.pop()[0].close()

    # -- the exchange ------------------------------------------------------------------

    def _framed(self, method: str, headers: CIMultiDict[str], body: Body) -> CIMultiDict[str]:
        wire: CIMultiDict[str] = CIMultiDict(Host=self._host_header)
        wire.extend(headers)
        size = body.size
        if size is not None:
            wire["Content-Length"] = str(size)
        elif body.stream is not None:
            if "Content-Length" not in wire:
                wire["Transfer-Encoding"] = "chunked"
        elif method not in BODILESS_METHODS:
            wire["Content-Length"] = "0"
        return wire

    async def _exchange(
        self,
        protocol: ResponseHandler,
        method: str,
        url: URL,
        wire: CIMultiDict[str],
        body: Body,
        timeouts: aiohttp.ClientTimeout,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=False,
            auto_decompress=False,
            read_timeout=timeouts.sock_read,
            read_bufsize=READ_BUFSIZE,
        )
        writer = StreamWriter(protocol, loop)
        if "Transfer-Encoding" in wire:
            writer.enable_chunking()
        await writer.write_headers(f"{method} {url.raw_path_qs} HTTP/1.1", wire)
        upload: asyncio.Task[None] | None = None
        parts = body.parts or ()
        kept_whole = body.stream is None and body.keeper is None
        if kept_whole and sum(len(part) for part in parts) <= INLINE_BODY_BYTES:
            await writer.write_eof(b"".join(parts))  # head and a small body in one write
            protocol.start_timeout()
        else:
            upload = asyncio.create_task(_upload(writer, protocol, body.chunks()))
        try:
            # Interim 1xx answers (but a 101) are skipped: the final one is relayed.
            while True:
                message, content = await protocol.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    return Answer(self, protocol, message, content, upload)
        except BaseException as exc:
            if upload is not None:
                upload.cancel()
            if isinstance(exc, HttpProcessingError):
                raise UpstreamUnreachable(
                    "the connection to the Pleo API failed (malformed response)"
                ) from None
            raise

    async def _connection(self, connect_timeout: float | None) -> tuple[ResponseHandler, bool]:
        """An idle connection (True: reused) or a new one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            protocol, since = self._idle.pop()
            if now - since < self._keepalive and protocol.is_connected():
                return protocol, True
            protocol.close()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                "could not connect to the Pleo API within the timeout"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS verification
            raise UpstreamUnreachable("cannot connect to the Pleo API") from exc
        return protocol, False

    def _prune(self) -> None:
        """Close connections idle past the keep-alive time (the oldest are first)."""
        self._prune_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and now - self._idle[0][1] >= self._keepalive:
            self._idle.popleft()[0].close()
        if self._idle and not self._closed:
            wait = self._keepalive - (now - self._idle[0][1])
            self._prune_handle = loop.call_later(wait, self._prune)


async def _upload(
    writer: StreamWriter,
    protocol: ResponseHandler,
    chunks: AsyncIterator[bytes],
) -> None:
    """The body, beside the read of the answer; a failure reaches that read."""
    try:
        async for chunk in chunks:
            await writer.write(chunk)
        await writer.write_eof()
    except ClientBodyTimeout as exc:
        protocol.set_exception(exc)  # our client went silent: that is the answer (408)
    except (OSError, aiohttp.ClientError) as exc:
        protocol.set_exception(aiohttp.ClientOSError(0, "cannot write the request body"), exc)
    else:
        protocol.start_timeout()
