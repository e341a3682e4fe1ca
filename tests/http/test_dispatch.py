"""The router shortcut: what it takes is exactly what the router gives the catch-all.

Requests the shortcut does not take (our endpoints, `%` in the path, `Expect`) go
through the application as before; the served tests check both kinds end to end.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Middleware
from hypothesis import given, settings, strategies as st
from yarl import URL

from proxy.http.access_log import REQUEST_ID_HEADER
from proxy.http.app import build_app
from proxy.http.dispatch import CATCH_ALL, _for_catch_all, shortcut
from proxy.http.front import front_middleware
from proxy.http.guard import Policy
from proxy.ops.metrics import Metrics
from tests.proxyproc import RecordingCredentials, proxy_config, run_proxy_app
from tests.upstreams import EchoUpstream, upstream

__all__ = ["upstream"]

# Pieces of paths that matter to the router: our mark, its parts, separators, dot
# segments, percent-escapes and the /c/NAME/ prefix.
PIECES = st.sampled_from(
    ["/", "_proxy", "_", "proxy", "c", "acme", "%5F", "%2F", ".", "..", "healthz", "x", "?"]
)
APP = build_app(proxy_config("http://127.0.0.1:9"), credentials=RecordingCredentials())


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=8).map(lambda parts: "/" + "".join(parts)))
def test_a_request_the_shortcut_takes_is_one_the_router_sends_to_the_catch_all(
    path: str,
) -> None:
    request = _as_parsed(path)
    if _for_catch_all(request):
        match = asyncio.run(APP.router.resolve(request))
        assert match.route.resource is not None
        assert match.route.resource.canonical == CATCH_ALL


def _as_parsed(target: str) -> web.Request:
    # As aiohttp's parser builds an origin-form target's URL: "//x" is a path there,
    # not an authority (make_mocked_request alone would parse it as one).
    path, _, query = target.partition("?")
    url = URL.build(path=path, query_string=query, encoded=True)
    return make_mocked_request("GET", target, app=APP).clone(rel_url=url)


def test_an_app_with_a_route_the_shortcut_would_take_is_refused() -> None:
    app = web.Application()
    app.router.add_get("/healthz", _ok)  # no /_proxy: the catch-all shortcut would take it
    app.router.add_route("*", "/{tail:.*}", _ok)
    with pytest.raises(ValueError, match="/healthz"):
        shortcut(app, _front())


def test_an_app_without_a_catch_all_is_refused() -> None:
    app = web.Application()
    app.router.add_get("/_proxy/healthz", _ok)
    with pytest.raises(ValueError, match="catch-all"):
        shortcut(app, _front())


async def test_served_apps_take_the_shortcut(upstream: EchoUpstream) -> None:
    async with run_proxy_app(proxy_config(upstream.url), RecordingCredentials()) as server:
        assert server.runner is not None
        assert server.runner.server is not None
        handler = server.runner.server.request_handler
        assert getattr(handler, "__qualname__", "") == "shortcut.<locals>.handle"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/_proxy/healthz", 200),
        ("/%5Fproxy/healthz", 200),  # decoded by the router: ours, never Pleo's
        ("/c/default/_proxy/readyz", 200),
        ("/_proxy/nope", 404),
    ],
)
async def test_our_paths_are_answered_by_us_and_never_forwarded(
    upstream: EchoUpstream, path: str, status: int
) -> None:
    async with (
        run_proxy_app(proxy_config(upstream.url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/").with_path(path, encoded=True)) as response,
    ):
        assert response.status == status
        assert REQUEST_ID_HEADER in response.headers
    assert upstream.hits == 0


@pytest.mark.parametrize("path", ["/v1/expenses?page=2", "/v1/a%20b", "/c/default/v1/x"])
async def test_pleo_paths_are_forwarded_either_way(upstream: EchoUpstream, path: str) -> None:
    async with (
        run_proxy_app(proxy_config(upstream.url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/").with_path(path, encoded=True)) as response,
    ):
        assert response.status == 200
        assert response.headers[REQUEST_ID_HEADER] == upstream.seen[0].headers[REQUEST_ID_HEADER]
    assert upstream.seen[0].raw_path == path.removeprefix("/c/default")


async def test_a_redirect_raised_by_a_handler_carries_the_request_id() -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/_proxy/elsewhere")

    app = web.Application(middlewares=[_front()])
    app.router.add_get("/_proxy/go", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/_proxy/go",
                headers={REQUEST_ID_HEADER: "r-9"},
                allow_redirects=False,
            ) as response,
        ):
            assert response.status == 302
            assert response.headers[REQUEST_ID_HEADER] == "r-9"
    finally:
        await runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _front() -> Middleware:
    policy = Policy.from_config(proxy_config("http://127.0.0.1:9"))
    return front_middleware(lambda: policy, Metrics(), client_keys=False)
