"""The forwarder against a real recording upstream: bytes, headers, streaming, errors, replay."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.config import Pleo, Refresh, Timeouts
from proxy.secret import Secret
from tests.proxyproc import RecordingCredentials, proxy_config, raw_http, run_proxy_app
from tests.upstreams import EchoUpstream, Responder, Seen, dead_port, upstream

MIB = 1024 * 1024

__all__ = ["upstream"]  # a fixture, used by name


@pytest.fixture
def credentials() -> RecordingCredentials:
    return RecordingCredentials()


@pytest.fixture
async def proxy(
    upstream: EchoUpstream, credentials: RecordingCredentials
) -> AsyncIterator[TestServer]:
    async with run_proxy_app(proxy_config(upstream.url), credentials) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # The test client adds nothing of its own either, so what the upstream sees is ours.
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding")
    ) as session:
        yield session


def url_of(server: TestServer, target: str) -> URL:
    return URL(f"http://127.0.0.1:{server.port}{target}", encoded=True)


def port_of(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def get_request(server: TestServer, target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/accounting-entries:search",
        "/v1/files/a%2Fb%2fc",
        "/v1/expenses?q=a+b&tag=x&tag=y&tag=x",
        "/v1/companies?name=%C3%A6%C3%B8%C3%A5&empty=&flag",
        "/v1/a/../b/./c//d",
        "/v1/x?redirect=http%3A%2F%2Fexample.com%2F%3Fa%3D1&semi=a;b",
        "/v1/%7Euser/%20space?x=%2B%25",
    ],
)
async def test_path_and_query_reach_upstream_byte_exact(
    proxy: TestServer, upstream: EchoUpstream, target: str
) -> None:
    response = await raw_http(port_of(proxy), get_request(proxy, target))

    assert response.status == 200
    assert [s.raw_path for s in upstream.seen] == [target]


async def test_request_headers_pass_through_minus_hop_by_hop(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
) -> None:
    headers = [
        ("X-Custom", "1"),
        ("X-CamelCase-ID", "c"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("Accept-Encoding", "gzip"),
        ("Authorization", "Bearer the-clients-own"),
        ("Connection", "keep-alive, X-Foo"),
        ("X-Foo", "hop-only"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
    ]
    async with client.get(url_of(proxy, "/v1/me"), headers=headers) as response:
        assert response.status == 200

    seen = upstream.seen[0].headers
    assert (b"X-CamelCase-ID", b"c") in upstream.seen[0].raw_headers
    assert seen.getall("X-Multi") == ["a", "b"]
    assert seen["X-Custom"] == "1"
    assert seen["Accept-Encoding"] == "gzip"
    assert seen.getall("Authorization") == ["Bearer token-1"]
    assert seen["Host"] == URL(upstream.url).raw_authority
    for name in ("X-Foo", "Keep-Alive", "TE", "Trailer", "Proxy-Authorization", "Proxy-Connection"):
        assert name not in seen, name
    assert "User-Agent" not in seen
    assert "keep-alive, X-Foo" not in seen.getall("Connection", [])


async def test_response_headers_and_bytes_pass_back(
    proxy: TestServer, upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    payload = json.dumps({"expenses": list(range(2000))}).encode()
    compressed = gzip.compress(payload)

    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.Response(body=compressed, status=207, content_type="application/json")
        response.headers["Content-Encoding"] = "gzip"
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        response.headers.add("X-Multi", "one")
        response.headers.add("X-Multi", "two")
        response.headers["Connection"] = "X-Up-Hop"
        response.headers["X-Up-Hop"] = "hop-only"
        response.headers["Proxy-Authenticate"] = "Basic"
        return response

    upstream.respond = respond
    async with client.get(url_of(proxy, "/v1/export")) as response:
        body = await response.read()
        assert response.status == 207
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
        assert response.headers.getall("X-Multi") == ["one", "two"]
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert "Transfer-Encoding" not in response.headers
        assert "X-Up-Hop" not in response.headers
        assert "Proxy-Authenticate" not in response.headers
    assert body == compressed  # still compressed, byte for byte


async def test_chunked_upstream_answer_is_streamed_chunked(
    proxy: TestServer, upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(50):
            await response.write(b"%d," % i)
        await response.write_eof()
        return response

    upstream.respond = respond
    async with client.get(url_of(proxy, "/v1/stream")) as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert await response.read() == b"".join(b"%d," % i for i in range(50))


@pytest.mark.parametrize(("status", "method"), [(200, "HEAD"), (204, "GET"), (304, "GET")])
async def test_bodyless_answers_have_no_body(
    proxy: TestServer, upstream: EchoUpstream, status: int, method: str
) -> None:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"ETag": '"v1"'})
        if method == "HEAD":
            response.content_length = 1234
        await response.prepare(request)
        await response.write_eof()
        return response

    upstream.respond = respond
    request = get_request(proxy, "/v1/receipt").replace(b"GET", method.encode(), 1)
    response = await raw_http(port_of(proxy), request)

    assert response.status == status
    assert b'ETag: "v1"' in response.head  # the name's case too
    assert response.body == b""
    if method == "HEAD":
        assert b"Content-Length: 1234" in response.head


async def test_expect_100_continue(proxy: TestServer, upstream: EchoUpstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            f"POST /v1/uploads HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()

    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.seen[0].body == b"hello"
    assert "Expect" not in upstream.seen[0].headers


async def body_pieces(total: int, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        yield bytes([sent % 251]) * size
        sent += size


async def test_small_chunked_upload_is_sent_with_its_length(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    async with client.post(url_of(proxy, "/v1/uploads"), data=body_pieces(300_000)) as response:
        assert response.status == 200
    seen = upstream.seen[0]
    assert len(seen.body) == 300_000
    assert seen.headers["Content-Length"] == "300000"
    assert "Transfer-Encoding" not in seen.headers
    assert credentials.authorization_calls == [True]


async def test_large_chunked_upload_is_streamed_chunked(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    expected = b"".join([piece async for piece in body_pieces(3 * MIB)])
    async with client.post(url_of(proxy, "/v1/uploads"), data=body_pieces(3 * MIB)) as response:
        assert response.status == 200
    seen = upstream.seen[0]
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(expected).digest()
    assert seen.headers["Transfer-Encoding"] == "chunked"
    assert credentials.authorization_calls == [False]


async def test_large_upload_with_length_keeps_its_length(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    body = bytes(range(256)) * (8 * 1024)  # 2 MiB > the 1 MiB replay limit
    async with client.put(url_of(proxy, "/v1/files/1"), data=io.BytesIO(body)) as response:
        assert response.status == 200
    seen = upstream.seen[0]
    assert seen.body == body
    assert seen.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in seen.headers
    assert credentials.authorization_calls == [False]


async def test_dead_upstream_is_502(
    client: aiohttp.ClientSession, credentials: RecordingCredentials
) -> None:
    with dead_port() as port:
        config = proxy_config(f"http://127.0.0.1:{port}")
        async with (
            run_proxy_app(config, credentials) as proxy,
            client.get(url_of(proxy, "/v1/me")) as response,
        ):
            body = await response.json()
    assert response.status == 502
    assert body["error"] == "upstream_unreachable"
    assert "token" not in json.dumps(body)


async def test_stalled_upstream_is_504(
    upstream: EchoUpstream, client: aiohttp.ClientSession, credentials: RecordingCredentials
) -> None:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response()

    upstream.respond = respond
    config = proxy_config(upstream.url, timeouts=Timeouts(connect=5, read=0.3, shutdown=1))
    started = time.monotonic()
    async with (
        run_proxy_app(config, credentials) as proxy,
        client.get(url_of(proxy, "/v1/slow")) as response,
    ):
        body = await response.json()
    assert response.status == 504
    assert body["error"] == "upstream_timeout"
    assert time.monotonic() - started < 5


async def test_upstream_dying_mid_body_truncates_the_answer(
    proxy: TestServer, upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await response.drain()
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.respond = respond
    async with client.get(url_of(proxy, "/v1/big")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_client_disconnect_cancels_the_upstream_request(
    proxy: TestServer, upstream: EchoUpstream
) -> None:
    arrived = asyncio.Event()

    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    upstream.respond = respond
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(get_request(proxy, "/v1/slow"))
    await writer.drain()
    await asyncio.wait_for(arrived.wait(), 5)
    writer.close()
    await writer.wait_closed()

    await asyncio.wait_for(upstream.cancelled.wait(), 5)


async def test_client_disconnect_mid_download_stops_the_upstream(
    proxy: TestServer, upstream: EchoUpstream
) -> None:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(3000):  # bounded: 30 s at most
            await response.write(b"x" * 1024)
            await asyncio.sleep(0.01)
        return response

    upstream.respond = respond
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(get_request(proxy, "/v1/endless"))
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.wait_for(reader.read(1024), 5)
    writer.close()
    await writer.wait_closed()

    await asyncio.wait_for(upstream.cancelled.wait(), 5)


def reject_token_1(body: bytes = b'{"error":"unauthorized"}') -> Responder:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.authorization == "Bearer token-1":
            return web.Response(status=401, body=body, headers={"WWW-Authenticate": "Bearer"})
        return web.json_response({"ok": True, "length": len(seen.body)})

    return respond


async def always_401(request: web.Request, seen: Seen) -> web.StreamResponse:
    return web.Response(
        status=401, body=b'{"error":"nope"}', headers={"WWW-Authenticate": "Bearer"}
    )


@pytest.mark.parametrize("chunked", [False, True])
async def test_401_is_replayed_once_with_the_new_credential(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
    chunked: bool,
) -> None:
    upstream.respond = reject_token_1()
    data = body_pieces(5000, 1000) if chunked else b"x" * 5000
    async with client.post(url_of(proxy, "/v1/expenses"), data=data) as response:
        assert response.status == 200
        assert await response.json() == {"ok": True, "length": 5000}

    assert [s.authorization for s in upstream.seen] == ["Bearer token-1", "Bearer token-2"]
    assert upstream.seen[0].body == upstream.seen[1].body
    assert len(upstream.seen[1].body) == 5000
    assert credentials.rejected == ["Bearer token-1"]


async def test_401_to_a_large_body_is_not_replayed(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    upstream.respond = reject_token_1()
    body = b"y" * (5 * MIB)
    async with client.post(url_of(proxy, "/v1/uploads"), data=io.BytesIO(body)) as response:
        assert response.status == 401
        assert response.headers["X-Pleo-Proxy-Replay"] == "body-too-large"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    assert upstream.hits == 1
    assert len(upstream.seen[0].body) == len(body)
    assert credentials.authorization_calls == [False]
    assert credentials.rejected == []


async def test_401_to_the_replay_goes_back_as_it_is(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    upstream.respond = always_401
    async with client.get(url_of(proxy, "/v1/me")) as response:
        assert response.status == 401
        assert await response.read() == b'{"error":"nope"}'
        assert "X-Pleo-Proxy-Replay" not in response.headers

    assert [s.authorization for s in upstream.seen] == ["Bearer token-1", "Bearer token-2"]
    assert credentials.rejected == ["Bearer token-1"]
    assert credentials.stored_since_calls == ["Bearer token-2"], "asked, and nothing newer"


async def test_a_replay_that_meets_a_rotation_by_another_process_is_sent_once_more(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    async def only_token_3(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.authorization != "Bearer token-3":
            return await always_401(request, seen)
        return web.json_response({"ok": True, "length": len(seen.body)})

    upstream.respond = only_token_3
    credentials.stored = "token-3"  # what another process stored while token-2 travelled
    async with client.post(url_of(proxy, "/v1/expenses"), data=b"z" * 100) as response:
        assert response.status == 200
        assert await response.json() == {"ok": True, "length": 100}
    assert [s.authorization for s in upstream.seen] == [
        "Bearer token-1",
        "Bearer token-2",
        "Bearer token-3",
    ]
    assert upstream.seen[2].body == b"z" * 100
    assert credentials.rejected == ["Bearer token-1"], "no refresh for the third send"


async def test_when_the_rotated_token_is_refused_too_its_401_goes_back(
    proxy: TestServer,
    upstream: EchoUpstream,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    upstream.respond = always_401
    credentials.stored = "token-3"
    async with client.get(url_of(proxy, "/v1/me")) as response:
        assert response.status == 401
    assert upstream.hits == 3, "one more send at most, never a loop"


async def test_401_without_a_new_credential_goes_back_as_it_is(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    credentials = RecordingCredentials(renew=False)
    upstream.respond = always_401
    async with (
        run_proxy_app(proxy_config(upstream.url), credentials) as proxy,
        client.get(url_of(proxy, "/v1/me")) as response,
    ):
        assert response.status == 401
    assert upstream.hits == 1
    assert credentials.rejected == ["Bearer token-1"]


async def test_api_key_mode_sends_basic_auth(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    config = proxy_config(upstream.url)
    config = replace(config, pleo=Pleo(api_url=upstream.url, api_key=Secret("key-123")))
    async with (
        run_proxy_app(config) as proxy,
        client.get(url_of(proxy, "/v1/me"), headers={"Authorization": "Bearer x"}) as response,
    ):
        assert response.status == 200
    expected = "Basic " + base64.b64encode(b"key-123:").decode()
    assert upstream.seen[0].headers.getall("Authorization") == [expected]


async def test_replay_limit_is_configurable(
    upstream: EchoUpstream, client: aiohttp.ClientSession, credentials: RecordingCredentials
) -> None:
    upstream.respond = reject_token_1()
    config = proxy_config(upstream.url, refresh=Refresh(replay_body_limit=10))
    async with (
        run_proxy_app(config, credentials) as proxy,
        client.post(url_of(proxy, "/v1/x"), data=b"0123456789A") as response,
    ):
        assert response.status == 401
        assert response.headers["X-Pleo-Proxy-Replay"] == "body-too-large"


async def test_200_concurrent_gets(
    proxy: TestServer, upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> int:
        async with client.get(url_of(proxy, f"/v1/items/{i}")) as response:
            body = await response.json()
            assert body["raw_path"] == f"/v1/items/{i}"
            return response.status

    statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 30)
    assert statuses == [200] * 200
    assert upstream.hits == 200


async def _slowly(body: bytes, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), piece):
        await asyncio.sleep(0.01)  # the answer can come while the body still arrives
        yield body[start : start + piece]


@pytest.mark.parametrize("slow_client", [False, True])
async def test_a_body_sent_as_it_arrives_is_replayed_whole_after_an_early_401(
    client: aiohttp.ClientSession, credentials: RecordingCredentials, slow_client: bool
) -> None:
    # Above 64 KiB a body within the replay limit goes to Pleo as it arrives and is kept
    # as it goes. Pleo's 401 comes before it read any of it: the replay must still carry
    # every byte, the kept ones and those still to come from the client.
    body = bytes(range(256)) * 3000  # 750 KiB
    received: list[tuple[str, bytes]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        if authorization == "Bearer token-1":
            received.append((authorization, b""))
            response = web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
            response.force_close()
            return response
        received.append((authorization, await request.read()))
        return web.json_response({"length": len(received[-1][1])})

    app = web.Application(client_max_size=4 * MIB)
    app.router.add_post("/v1/files", handle)
    async with TestServer(app, host="127.0.0.1", port=0) as pleo:
        url = str(pleo.make_url("")).rstrip("/")
        async with run_proxy_app(proxy_config(url), credentials) as proxy:
            headers = {"Content-Length": str(len(body))}
            data = _slowly(body) if slow_client else io.BytesIO(body)
            async with client.post(
                url_of(proxy, "/v1/files"), data=data, headers=headers
            ) as response:
                assert response.status == 200
                assert await response.json() == {"length": len(body)}
    assert [a for a, _ in received] == ["Bearer token-1", "Bearer token-2"]
    assert received[1][1] == body
    assert credentials.rejected == ["Bearer token-1"]


async def test_a_body_sent_as_it_arrives_is_replayed_whole_after_a_late_401(
    upstream: EchoUpstream,
    proxy: TestServer,
    client: aiohttp.ClientSession,
    credentials: RecordingCredentials,
) -> None:
    upstream.respond = reject_token_1()
    body = bytes(range(256)) * 2000  # 500 KiB: sent as it arrives, and kept
    async with client.post(url_of(proxy, "/v1/files"), data=io.BytesIO(body)) as response:
        assert response.status == 200
        assert await response.json() == {"ok": True, "length": len(body)}
    assert [s.body for s in upstream.seen] == [body, body]
    assert [s.headers["Content-Length"] for s in upstream.seen] == [str(len(body))] * 2
