"""Corporate networks: HTTP(S)_PROXY / NO_PROXY are honoured; ~/.netrc never interferes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.lifecycle.credentials import ApiKeySource
from proxy.secret import Secret
from tests.proxyproc import proxy_config, run_proxy_app
from tests.upstreams import run_echo_upstream


@asynccontextmanager
async def corporate_proxy(seen: list[str]) -> AsyncIterator[TestServer]:
    """A forward-proxy stand-in: records the absolute-form target it is asked for."""

    async def handle(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response({"via": "corporate proxy"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("bypass", [False, True], ids=["via-proxy", "no-proxy"])
async def test_environment_proxy_is_used_unless_no_proxy_names_the_api(
    monkeypatch: pytest.MonkeyPatch, bypass: bool
) -> None:
    seen: list[str] = []
    async with run_echo_upstream() as upstream, corporate_proxy(seen) as corp:
        for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{corp.port}")
        if bypass:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        config = proxy_config(upstream.url)
        async with run_proxy_app(config, ApiKeySource(Secret("k"))) as proxy:
            status, _ = await get_json(str(proxy.make_url("/v1/expenses?x=1")))
    assert status == 200
    if bypass:
        assert (seen, upstream.hits) == ([], 1)
    else:
        assert (seen, upstream.hits) == ([f"{upstream.url}/v1/expenses?x=1"], 0)


async def test_a_netrc_entry_for_the_api_host_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    async with run_echo_upstream() as upstream:
        async with run_proxy_app(proxy_config(upstream.url), ApiKeySource(Secret("k"))) as proxy:
            status, _ = await get_json(str(proxy.make_url("/v1/expenses")))
        assert status == 200
        assert upstream.hits == 1
        sent = dict(upstream.seen[0].headers)
    assert sent["Authorization"] == "Basic azo="  # base64("k:"), not the netrc login
