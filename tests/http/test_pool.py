"""The forwarder's own upstream client, through the real proxy: what it sends on the wire,
keep-alive reuse and expiry, the one resend on a stale connection (idempotent, kept
bodies only), interim answers, early answers to uploads, and failures as JSON."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.http.body import Body
from proxy.http.pool import Answer, UpstreamPool
from tests.proxyproc import RecordingCredentials, proxy_config, run_proxy_app, run_served

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@dataclass
class Wire:
    """What a raw upstream saw: each request head with the connection it came on."""

    heads: list[tuple[int, bytes]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: int = 0


Answerer = Callable[[int, int, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@asynccontextmanager
async def raw_upstream(answer: Answerer) -> AsyncIterator[tuple[str, Wire]]:
    """A keep-alive upstream on raw sockets: `answer` writes the reply for request `nth`
    on connection `conn` (and returns False to close the connection unanswered)."""
    wire = Wire()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wire.connections += 1
        conn = wire.connections
        nth = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                nth += 1
                wire.heads.append((conn, head))
                length = _content_length(head)
                if length:
                    wire.bodies.append(await reader.readexactly(length))
                if not await answer(conn, nth, head, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            wire.closed += 1
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", wire
    finally:
        server.close()
        await server.wait_closed()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def header_lines(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")[1:] if line]


async def ok_writer(
    conn: int, nth: int, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(OK)
    return True


async def test_requests_reuse_one_connection_and_the_wire_carries_only_what_was_sent() -> None:
    async with (
        raw_upstream(ok_writer) as (url, wire),
        run_proxy_app(proxy_config(url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as client,
    ):
        for _ in range(5):
            async with client.get(server.make_url("/v1/a?x=a%20b&y=1"), headers={"X-A": "b"}) as r:
                assert r.status == 200
                assert await r.read() == b"ok"
        async with client.post(server.make_url("/v1/empty")) as r:
            assert r.status == 200
    assert wire.connections == 1, "keep-alive: one upstream connection for six requests"
    first = wire.heads[0][1]
    assert first.split(b"\r\n")[0] == b"GET /v1/a?x=a%20b&y=1 HTTP/1.1"
    lines = header_lines(first)
    assert lines[0] == b"Host: " + url.removeprefix("http://").encode()
    assert b"X-A: b" in lines
    assert b"Authorization: Bearer token-1" in lines
    names = {line.partition(b":")[0].lower() for line in lines}
    # The client's own (aiohttp sends Accept, Accept-Encoding, User-Agent) and ours: the
    # pool adds nothing, not even a Content-Length for a GET.
    assert names == {
        b"host", b"accept", b"accept-encoding", b"user-agent", b"x-a", b"authorization",
        b"x-request-id",
    }  # fmt: skip
    post = header_lines(wire.heads[-1][1])
    assert b"Content-Length: 0" in post, "a POST without a body says so"


async def test_an_idle_connection_is_closed_after_the_keepalive_time() -> None:
    async with raw_upstream(ok_writer) as (url, wire):
        pool = UpstreamPool(url, ssl.create_default_context(), keepalive=0.2)
        try:
            for _ in range(2):
                answer = await _get(pool, url)
                assert answer.status == 200
                assert await answer.content.read() == b"ok"
                answer.release()
            assert wire.connections == 1
            deadline = time.monotonic() + 5
            while wire.closed < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert wire.closed == 1, "the idle connection was closed by the pool"
            answer = await _get(pool, url)
            assert answer.status == 200
            answer.release()
            assert wire.connections == 2
        finally:
            await pool.close()


async def _get(pool: UpstreamPool, url: str) -> Answer:
    return await pool.send(
        "GET",
        URL(url + "/v1/x"),
        CIMultiDict(),
        Body(),
        aiohttp.ClientTimeout(sock_connect=5, sock_read=5),
    )


async def close_the_second_unanswered(
    conn: int, nth: int, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    if conn == 1 and nth == 2:
        return False  # as a server whose idle timeout fired just as the request arrived
    writer.write(OK)
    return True


@pytest.mark.parametrize(
    ("method", "body", "resent"),
    [("GET", None, True), ("PUT", b"kept", True), ("POST", b"kept", False)],
)
async def test_a_stale_reused_connection_is_resent_once_only_when_idempotent(
    method: str, body: bytes | None, resent: bool
) -> None:
    async with (
        raw_upstream(close_the_second_unanswered) as (url, wire),
        run_proxy_app(proxy_config(url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(server.make_url("/v1/warm")) as r:
            assert r.status == 200
        async with client.request(method, server.make_url("/v1/again"), data=body) as r:
            status = r.status
            answer = await r.json() if status != 200 else None
    if resent:
        assert status == 200
        assert [conn for conn, _ in wire.heads] == [1, 1, 2]
    else:
        assert status == 502
        assert answer is not None
        assert answer["error"] == "upstream_unreachable"
        assert len(wire.heads) == 2, "a POST is never sent twice"


async def early_hints_then_ok(
    conn: int, nth: int, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK)
    return True


async def test_an_interim_answer_is_skipped_and_the_final_one_relayed() -> None:
    async with (
        raw_upstream(early_hints_then_ok) as (url, _),
        run_proxy_app(proxy_config(url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as client,
        client.get(server.make_url("/v1/hinted")) as r,
    ):
        assert r.status == 200
        assert await r.read() == b"ok"


async def refuse_early(
    conn: int, nth: int, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
    await writer.drain()
    await asyncio.sleep(3)  # never reads the body
    return False


async def test_pleo_answering_an_upload_before_reading_it_is_relayed_at_once() -> None:
    # No Content-Length on the raw upstream's side: `raw_upstream` reads no body here.
    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536
            await asyncio.sleep(0)

    async with (
        raw_upstream(refuse_early) as (url, _),
        run_proxy_app(proxy_config(url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as client,
    ):
        started = time.monotonic()
        async with client.post(server.make_url("/v1/upload"), data=upload()) as r:
            assert r.status == 413
            assert await r.read() == b"big"
        assert time.monotonic() - started < 2.5, "not held until the upstream gave up"


async def malformed(
    conn: int, nth: int, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
    return True


async def test_a_malformed_answer_is_a_502_without_details() -> None:
    async with (
        raw_upstream(malformed) as (url, _),
        run_proxy_app(proxy_config(url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as client,
        client.get(server.make_url("/v1/bad")) as r,
    ):
        assert r.status == 502
        answer = await r.json()
    assert answer["error"] == "upstream_unreachable"
    assert "token-1" not in str(answer)


async def test_a_compressed_upload_reaches_pleo_byte_for_byte_with_its_encoding() -> None:
    payload = gzip.compress(b'{"note": "' + b"x" * 5000 + b'"}')
    async with (
        raw_upstream(ok_writer) as (url, wire),
        run_served(proxy_config(url), RecordingCredentials()) as port,
        aiohttp.ClientSession() as client,
        client.post(
            f"http://127.0.0.1:{port}/v1/receipts",
            data=payload,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as r,
    ):
        assert r.status == 200
    assert wire.bodies == [payload], "not inflated on the way"
    lines = header_lines(wire.heads[0][1])
    assert b"Content-Encoding: gzip" in lines
    assert f"Content-Length: {len(payload)}".encode() in lines
