"""The one middleware: every request counted in flight, the guard before anything else,
and every failure of a handler answered as JSON (nothing of the exception's text)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import UpstreamBusy
from proxy.http.front import front_middleware
from proxy.http.guard import REFUSALS_KEY, Policy
from proxy.ops.metrics import Metrics
from tests.proxyproc import proxy_config

SECRET_TEXT = "internal-detail-never-shown"


class Handlers:
    def __init__(self) -> None:
        self.reached: list[str] = []
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self, request: web.Request) -> web.Response:
        self.reached.append(request.path)
        self.holding.set()
        await self.release.wait()
        return web.json_response({"ok": True})

    async def crash(self, request: web.Request) -> web.Response:
        self.reached.append(request.path)
        raise RuntimeError(SECRET_TEXT)

    async def busy(self, request: web.Request) -> web.Response:
        self.reached.append(request.path)
        raise UpstreamBusy("every connection is in use")

    async def gone(self, request: web.Request) -> web.Response:
        self.reached.append(request.path)
        raise web.HTTPMethodNotAllowed("GET", ["POST"])


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestServer, Handlers, Metrics, collections.Counter[str]]]:
    policy = Policy.from_config(proxy_config("http://127.0.0.1:9"))
    metrics = Metrics()
    handlers = Handlers()
    app = web.Application(middlewares=[front_middleware(lambda: policy, metrics)])
    refusals: collections.Counter[str] = collections.Counter()
    app[REFUSALS_KEY] = refusals
    app.router.add_get("/hold", handlers.hold)
    app.router.add_get("/crash", handlers.crash)
    app.router.add_get("/busy", handlers.busy)
    app.router.add_get("/gone", handlers.gone)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server, handlers, metrics, refusals
    finally:
        await server.close()


def gauge(metrics: Metrics) -> float:
    sample = f"pleo_proxy_in_flight_requests {float(metrics.traffic.in_flight)}"
    assert sample.encode() in metrics.render()[0]
    return float(metrics.traffic.in_flight)


async def test_a_request_is_in_flight_until_its_answer_and_not_after(
    served: tuple[TestServer, Handlers, Metrics, collections.Counter[str]],
) -> None:
    server, handlers, metrics, _ = served
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(server.make_url("/hold")))
        await asyncio.wait_for(handlers.holding.wait(), 5)
        assert gauge(metrics) == 1
        handlers.release.set()
        async with await pending as response:
            assert response.status == 200
        async with session.get(server.make_url("/crash")) as response:
            assert response.status == 500
    assert gauge(metrics) == 0, "a failed request is not left counted"


async def test_a_refused_request_reaches_no_handler_and_is_counted(
    served: tuple[TestServer, Handlers, Metrics, collections.Counter[str]],
) -> None:
    server, handlers, metrics, refusals = served
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/crash"), headers={"Host": "evil.example"}) as response,
    ):
        assert response.status == 421
        assert (await response.json())["error"] == "host_not_allowed"
        assert response.headers["Connection"] == "close"
    assert handlers.reached == []
    assert sum(refusals.values()) == 1
    assert gauge(metrics) == 0


async def test_handler_failures_become_json_without_their_text(
    served: tuple[TestServer, Handlers, Metrics, collections.Counter[str]],
) -> None:
    server, handlers, _, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/crash")) as response:
            text = await response.text()
            assert response.status == 500
            assert SECRET_TEXT not in text
            assert (await response.json())["error"] == "internal_error"
        async with session.get(server.make_url("/busy")) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "upstream_busy"
        async with session.get(server.make_url("/gone")) as response:
            assert response.status == 405
            assert (await response.json())["error"] == "method_not_allowed"
            assert response.headers["Allow"] == "POST"
        async with session.get(server.make_url("/nowhere")) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "not_found"
    assert handlers.reached == ["/crash", "/busy", "/gone"]
