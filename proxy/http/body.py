"""The request body as the forwarder sends it: kept (replayable) or streamed once.

Owns the up-front decision (httpx's `requires_request_body` idea: a body up to the
replay bound is kept, a larger or unknown-past-the-bound one is streamed and never
replayed; a kept body over 64 KiB with a Content-Length is sent while it arrives),
the deferred `100 Continue`, and cutting off a client that stops sending.
Must not forward, retry or read more than the bound plus one byte before deciding.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.errors import ClientBodyTimeout

LARGE_BYTES_BODY = 1024 * 1024
# Up to this size a kept body is read before it is sent (the pool writes it with the head).
KEEP_WHOLE_BYTES = 2**16


@dataclass(frozen=True)
class Body:
    """The request body as it will be sent: kept (replayable) or streamed once.

    A kept body stays in the pieces it arrived in: joining them would copy up to
    `replay_body_limit` per request for nothing (the pool sends the pieces as they are).
    """

    parts: tuple[bytes, ...] | None = None  # kept whole (() for an empty body); None: none
    stream: AsyncIterator[bytes] | None = None
    keeper: Keeper | None = None  # kept while it is sent

    @property
    def replayable(self) -> bool:
        return self.stream is None

    @property
    def size(self) -> int | None:
        """The replayable body's length; None when it is streamed once (or absent)."""
        if self.keeper is not None:
            return self.keeper.length
        return None if self.parts is None else sum(len(part) for part in self.parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """The body to send, from its start; a replayable body can be sent again."""
        if self.keeper is not None:
            return self.keeper.chunks()
        if self.stream is not None:
            return self.stream
        return _each(self.parts or ())

    @property
    def data(self) -> bytes | None:
        """The kept body in one piece (a copy: for aiohttp's client only)."""
        return None if self.parts is None else b"".join(self.parts)

    def payload(self) -> bytes | io.BytesIO | AsyncIterator[bytes] | None:
        """What aiohttp sends; a fresh object per call, so a kept body can be sent twice."""
        if self.stream is not None or self.keeper is not None:
            return self.chunks()
        data = self.data
        if data is not None and len(data) > LARGE_BYTES_BODY:
            # aiohttp warns about (and writes in one go) large raw bytes; BytesIO is
            # written in chunks and shares the buffer rather than copying it.
            return io.BytesIO(data)
        return data


class Keeper:
    """A body of known length, at most the replay limit, sent as it arrives and kept.

    The first send reads what the client has sent so far (`readany`: fewer, larger
    writes upstream than chunk by chunk, measured faster) and keeps it before passing it
    on; a later one (a replay after a 401, a retry, a resend on a stale connection) gives the
    kept chunks and then reads on where the last one stopped: Pleo may answer before
    it has the whole body. Sends are one after another, never two at once. Reading the
    whole body first, as before, held the upload back by the time it takes to arrive.
    """

    def __init__(self, stream: aiohttp.StreamReader, length: int, stall_after: float) -> None:
        self.length = length
        self._stream = stream
        self._stall_after = stall_after
        self._parts: list[bytes] = []
        self._ended = False

    async def chunks(self) -> AsyncIterator[bytes]:
        # Each send iterates its own generator from one task (the deadline's): one
        # deadline per send, armed only while waiting for the client.
        index = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    if index < len(self._parts):
                        yield self._parts[index]
                        index += 1
                        continue
                    if self._ended:
                        return
                    deadline.reschedule(loop.time() + self._stall_after)
                    chunk = await self._stream.readany()  # as the streamed upload reads
                    deadline.reschedule(None)
                    if chunk:
                        self._parts.append(chunk)
                    else:
                        self._ended = True
        except TimeoutError:
            raise _stalled(self._stall_after) from None


def _stalled(stall_after: float) -> ClientBodyTimeout:
    return ClientBodyTimeout(
        f"no request body bytes for {stall_after:g} s; the request was abandoned"
    )


async def _each(parts: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for part in parts:  # shared with a replay, which sends them again: never consumed
        yield part


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """Expect handler: answer `100 Continue` only when the forwarder reads the body.

    aiohttp's default sends it before the middlewares run; deferring it means a request
    the guard refuses is refused before the client uploads anything.
    """
    if request.headers.get("Expect", "").lower() != "100-continue":
        return web.json_response(
            {"error": "expectation_failed", "detail": "only Expect: 100-continue is supported"},
            status=417,
        )
    return None


async def _send_continue(request: web.Request) -> None:
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Like aiohttp's own expect handler: the interim line is not part of the body.
        request.writer.output_size = 0


async def _read_up_to(
    stream: aiohttp.StreamReader, limit: int, stall_after: float
) -> tuple[bytes, ...]:
    """The body's chunks as they arrived until more than `limit - 1` bytes are in (or the
    end); the last chunk may go past `limit`."""
    parts: list[bytes] = []
    size = 0
    async with contextlib.aclosing(_chunks(stream, stall_after)) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    return tuple(parts)


async def _relay_stream(
    prefix: tuple[bytes, ...], stream: aiohttp.StreamReader, stall_after: float
) -> AsyncIterator[bytes]:
    for part in prefix:
        yield part
    # Whatever has arrived, as it is: re-cutting into exact sizes halved upload
    # throughput (bench/README.md); the reader's buffer limit still bounds memory.
    async for chunk in _chunks(stream, stall_after, joined=True):
        yield chunk


async def _chunks(
    stream: aiohttp.StreamReader, stall_after: float, *, joined: bool = False
) -> AsyncGenerator[bytes, None]:
    """The body as the reader buffered it, chunk by chunk; a client that stops sending
    for `stall_after` seconds is cut off. Iterate it from one task (the deadline's).

    `readchunk()` hands over a buffered chunk as it is; `read(n)` and `readany()` join
    what is buffered into a new bytes object, a copy of every body byte. A streamed
    upload still takes it `joined` (readany): fewer, larger writes upstream measured
    faster there (bench/README.md), a kept body has no writes to save. One deadline,
    armed only while waiting for the client (never while the consumer has the chunk),
    instead of a timeout context per read.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as deadline:
            while True:
                deadline.reschedule(loop.time() + stall_after)
                if joined:
                    chunk, end_of_http_chunk = await stream.readany(), False
                else:
                    chunk, end_of_http_chunk = await stream.readchunk()
                deadline.reschedule(None)
                if chunk:
                    yield chunk
                elif not end_of_http_chunk:  # else a chunked body's boundary, not its end
                    return
    except TimeoutError:
        raise _stalled(stall_after) from None


async def read_body(request: web.Request, limit: int, *, stall_after: float) -> Body:
    """Decide up front whether the body can be replayed (kept, ≤ limit) or is streamed once.

    `stall_after` bounds each wait for client bytes (the read timeout, as upstream).
    """
    if not request.body_exists:
        return Body()
    await _send_continue(request)
    length = request.content_length
    if length is not None and length <= min(limit, KEEP_WHOLE_BYTES):
        # Small: read first, then sent with its head in one write.
        return Body(parts=await _read_up_to(request.content, length, stall_after))
    if length is not None and length <= limit:
        return Body(keeper=Keeper(request.content, length, stall_after))
    if length is not None:
        return Body(stream=_relay_stream((), request.content, stall_after))
    # Unknown length (chunked): read one byte past the limit to learn which case it is.
    prefix = await _read_up_to(request.content, limit + 1, stall_after)
    if sum(len(part) for part in prefix) <= limit:
        return Body(parts=prefix)
    return Body(stream=_relay_stream(prefix, request.content, stall_after))
