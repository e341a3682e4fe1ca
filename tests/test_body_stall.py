"""A client that stops sending its request body is cut off after the read timeout.

Each case: a small body kept for replay (nothing has gone upstream yet), a larger one
within the replay limit, kept while it is sent, and a large streamed one (for the last
two the upstream request is already under way and is abandoned).
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Timeouts
from tests.http.test_limits import run_limited_proxy
from tests.proxyproc import proxy_config
from tests.upstreams import run_echo_upstream


@pytest.mark.parametrize(
    ("length", "sent"),
    [(100, 10), (500_000, 100_000), (5_000_000, 2_000_000)],
    ids=["kept-for-replay", "kept-while-sent", "streamed"],
)
async def test_a_stalled_request_body_is_cut_off_after_the_read_timeout(
    length: int, sent: int
) -> None:
    async with run_echo_upstream() as upstream:
        config = proxy_config(upstream.url, timeouts=Timeouts(connect=1.0, read=1.0, shutdown=2.0))
        async with run_limited_proxy(config) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            head = f"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n"
            writer.write(head.encode() + b"x" * sent)  # part of the promised body, then nothing
            await writer.drain()
            try:
                async with asyncio.timeout(5):
                    answer = await reader.read()  # until the proxy answers and closes
            finally:
                writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b'"request_timeout"' in answer
            assert upstream.hits == 0
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"http://127.0.0.1:{proxy.port}/v1/ok") as resp,
            ):
                assert resp.status == 200


async def test_an_upstream_slow_to_take_a_streamed_body_is_not_a_stalled_client() -> None:
    # The deadline runs only while the proxy waits for the client: here the client has
    # sent everything and Pleo starts reading only after longer than the read timeout;
    # the proxy, waiting to write, is not waiting for the client.
    length = 6_000_000  # more than the socket buffers hold: the proxy waits to write

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)  # longer than the read timeout, with the body unread
        total = 0
        while chunk := await request.content.read(1_000_000):
            total += len(chunk)
        return web.json_response({"received": total})

    app = web.Application(client_max_size=length * 2)
    app.router.add_post("/v1/upload", handle)
    async with TestServer(app, host="127.0.0.1", port=0) as upstream:
        url = str(upstream.make_url("")).rstrip("/")
        config = proxy_config(url, timeouts=Timeouts(connect=1.0, read=1.0, shutdown=2.0))
        async with (
            asyncio.timeout(15),
            run_limited_proxy(config) as proxy,
            aiohttp.ClientSession() as client,
            client.post(
                f"http://127.0.0.1:{proxy.port}/v1/upload", data=io.BytesIO(b"x" * length)
            ) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json()) == {"received": length}
