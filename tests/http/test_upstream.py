"""The upstream pool: bounded, and a request that cannot get a connection in time is
answered 503 upstream_busy instead of queueing without bound; never forwarded."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from proxy.config.traffic import Upstream
from proxy.errors import UpstreamBusy
from proxy.http.upstream import UpstreamGate
from tests.proxyproc import RecordingCredentials, proxy_config, run_proxy_app
from tests.upstreams import EchoUpstream, Seen, upstream

__all__ = ["upstream"]


async def test_a_request_that_finds_every_connection_busy_gets_503_and_is_not_sent(
    upstream: EchoUpstream,
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"ok": True})

    upstream.respond = slow
    config = proxy_config(upstream.url, upstream=Upstream(max_connections=2, queue_timeout=0.3))
    async with (
        run_proxy_app(config, RecordingCredentials()) as server,
        aiohttp.ClientSession() as s,
    ):
        url = str(server.make_url("/v1/slow"))
        held = [asyncio.create_task(s.get(url)) for _ in range(2)]
        while upstream.hits < 2:
            await asyncio.sleep(0.01)
        async with s.get(url) as busy:
            assert busy.status == 503
            assert (await busy.json())["error"] == "upstream_busy"
            assert busy.headers["Retry-After"] == "1"
        assert upstream.hits == 2, "the refused request never left"
        release.set()
        for task in held:
            response = await task
            assert response.status == 200
            response.release()
        async with s.get(url) as again:
            assert again.status == 200, "a freed connection serves the next request"


async def test_without_a_bound_slow_answers_do_not_queue(upstream: EchoUpstream) -> None:
    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({"ok": True})

    upstream.respond = slow
    config = proxy_config(upstream.url, upstream=Upstream(max_connections=0))
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        run_proxy_app(config, RecordingCredentials()) as server,
        aiohttp.ClientSession(connector=connector) as s,
    ):
        url = str(server.make_url("/v1/slow"))

        async def one() -> int:
            async with s.get(url) as response:
                return response.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(300))), 20)
    assert set(statuses) == {200}
    assert upstream.hits == 300


async def test_the_gate_hands_slots_on_in_arrival_order_and_a_waiter_that_gives_up_takes_none() -> (
    None
):
    gate = UpstreamGate(2, queue_timeout=5.0)
    await gate.__aenter__()
    await gate.__aenter__()
    order: list[int] = []

    async def wait_then_hold(index: int) -> None:
        async with gate:
            order.append(index)
            await asyncio.sleep(0)

    waiting = [asyncio.create_task(wait_then_hold(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    waiting[2].cancel()  # a client gone while queued: its place is dropped, not kept
    await asyncio.sleep(0.01)
    assert order == []
    assert gate.in_use == 2
    gate.release()
    gate.release()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert order == [0, 1, 3, 4]
    assert isinstance(results[2], asyncio.CancelledError)
    assert gate.in_use == 0, "every slot given back, none lost to the cancelled waiter"


async def test_a_queued_request_past_the_queue_timeout_is_busy_and_leaves_the_count_true() -> None:
    gate = UpstreamGate(1, queue_timeout=0.05)
    async with gate:
        with pytest.raises(UpstreamBusy) as busy:
            async with gate:
                raise AssertionError("a second slot was handed out")
        assert busy.value.status == 503
        assert gate.in_use == 1
    assert gate.in_use == 0
    async with gate:
        assert gate.in_use == 1, "a freed slot is taken without waiting"
