"""proxy/limits.py: each `limits.*` value is enforced by a real proxy over raw sockets.

A request over a limit gets a 400 (or a closed connection), never reaches the upstream,
and the proxy serves the next request. The limits are set low so the tests are cheap;
the good and bad sizes sit well inside and well outside them, because aiohttp's C and
pure-Python parsers count a little differently (target vs whole line, value vs field).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestServer

from proxy.config import Config, Limits
from proxy.http.app import build_app
from proxy.http.limits import server_limits
from proxy.http.serve import serve
from tests.proxyproc import RawResponse, RecordingCredentials, proxy_config, raw_http
from tests.upstreams import EchoUpstream, upstream

__all__ = ["upstream"]  # a fixture, used by name

LOW = Limits(max_request_line=300, max_header_size=300, max_headers=10, idle_timeout=1.0)
CLOSE_BOUND = 5.0  # seconds: far above idle_timeout=1, far below the test timeout


@asynccontextmanager
async def run_limited_proxy(config: Config) -> AsyncIterator[TestServer]:
    """`build_app(config)` served with `server_limits(config)`, as `serve()` passes them."""
    server = TestServer(build_app(config, credentials=RecordingCredentials()), port=0)
    await server.start_server(**server_limits(config))
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def proxy_port(upstream: EchoUpstream) -> AsyncIterator[int]:
    async with run_limited_proxy(proxy_config(upstream.url, limits=LOW)) as server:
        assert server.port is not None
        yield server.port


def request(target: str = "/v1/ok", *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def assert_serves(port: int, upstream: EchoUpstream) -> None:
    """A normal request still works, and it is the only new one the upstream sees."""
    before = upstream.hits
    response = await raw_http(port, request("/v1/after"))
    assert response.status == 200
    assert [seen.raw_path for seen in upstream.seen[before:]] == ["/v1/after"]


def test_server_limits_map_every_limit_to_aiohttp() -> None:
    config = proxy_config("http://127.0.0.1:1", limits=LOW)
    assert server_limits(config) == {
        "max_line_size": 300,
        "max_field_size": 300,
        "max_headers": 10,
        "keepalive_timeout": 1.0,
    }


def test_defaults_are_safe() -> None:
    limits = server_limits(Config())
    assert limits["max_line_size"] == limits["max_field_size"] == 8190
    assert limits["max_headers"] == 100
    assert 0 < limits["keepalive_timeout"] <= 60


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        (request("/v1/" + "a" * 200), request("/v1/" + "a" * 400)),
        (request("/v1/ok", "X-Big: " + "v" * 200), request("/v1/ok", "X-Big: " + "v" * 400)),
        (
            request("/v1/ok", *(f"X-H{i}: v" for i in range(5))),
            request("/v1/ok", *(f"X-H{i}: v" for i in range(20))),
        ),
    ],
    ids=["request-line", "header-size", "header-count"],
)
async def test_a_request_over_a_limit_is_refused_and_not_forwarded(
    good: bytes, bad: bytes, proxy_port: int, upstream: EchoUpstream
) -> None:
    assert (await raw_http(proxy_port, good)).status == 200
    assert upstream.hits == 1
    refused = await raw_http(proxy_port, bad)
    assert refused.status == 400
    assert upstream.hits == 1
    await assert_serves(proxy_port, upstream)


async def test_default_limits_refuse_a_header_of_max_plus_one_bytes(
    upstream: EchoUpstream,
) -> None:
    async with run_limited_proxy(proxy_config(upstream.url)) as server:
        assert server.port is not None
        at_limit = request("/v1/ok", "X-Big: " + "v" * 8000)
        over = request("/v1/ok", "X-Big: " + "v" * 8191)
        assert (await raw_http(server.port, at_limit)).status == 200
        assert (await raw_http(server.port, over)).status == 400
        assert upstream.hits == 1
        await assert_serves(server.port, upstream)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


async def test_trickled_headers_are_cut_off_after_the_idle_timeout(
    proxy_port: int, upstream: EchoUpstream
) -> None:
    """Slowloris: a byte every 0.1 s never completes the head; the proxy hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    started = time.monotonic()
    head = b"GET /v1/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    try:
        async with asyncio.timeout(CLOSE_BOUND):
            for byte in head:
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
            await read_until_closed(reader)
    except ConnectionError:
        pass  # the close may come as a reset while we are still writing
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < CLOSE_BOUND
    assert upstream.hits == 0
    await assert_serves(proxy_port, upstream)


async def test_a_silent_connection_is_closed_after_the_idle_timeout(proxy_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    started = time.monotonic()
    try:
        async with asyncio.timeout(CLOSE_BOUND):
            assert await read_until_closed(reader) == b""
    finally:
        writer.close()
    assert 0.9 <= time.monotonic() - started < CLOSE_BOUND


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    proxy_port: int, upstream: EchoUpstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(b"GET /v1/ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(CLOSE_BOUND):
            answer = await read_until_closed(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert upstream.hits == 1


async def test_a_refusal_body_is_a_short_plain_answer(proxy_port: int) -> None:
    response: RawResponse = await raw_http(proxy_port, request("/v1/" + "a" * 400))
    assert response.status == 400
    assert len(response.body) < 1024  # at most a prefix of the line, never all of it


async def test_serve_enforces_the_configured_limits(upstream: EchoUpstream) -> None:
    """The served proxy (not only this module's harness) passes `server_limits` on."""
    config = proxy_config(upstream.url, limits=LOW)
    ports: list[int] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            config,
            credentials=RecordingCredentials(),
            stop=stop,
            on_listening=lambda addresses: ports.append(addresses[0][1]),
        )
    )
    try:
        async with asyncio.timeout(10):
            while not ports:
                await asyncio.sleep(0.01)
        port = ports[0]
        assert (await raw_http(port, request("/v1/ok", "X-Big: " + "v" * 400))).status == 400
        assert upstream.hits == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        async with asyncio.timeout(CLOSE_BOUND):
            assert await read_until_closed(reader) == b""
        writer.close()
        assert time.monotonic() - started < CLOSE_BOUND
        await assert_serves(port, upstream)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
