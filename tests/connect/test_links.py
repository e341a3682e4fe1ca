"""Connect links, driven as a browser would against a served proxy and the sandbox: the
page a link opens, the flow it starts, its one use and its expiry, `return_to`, one
callback for every connection, and the pages listener that serves only these pages."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from proxy.cli_tokens import with_registry
from proxy.config import Config, Pages
from proxy.connect.pages import PAGE_HEADER
from proxy.http.app import build_app, runner_options
from proxy.lifecycle.registry import IssuedLink, Registry
from proxy.urls import url_with_code
from tests.connections import (
    admin_headers,
    connections_config,
    distinct_companies,
    get_json,
    serving,
    url_of,
)
from tests.processes import free_port
from tests.sandboxes import RunningSandbox, get_grants, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]

pytestmark = pytest.mark.timeout(60)

TIMEOUT = aiohttp.ClientTimeout(total=15)
API = "/_proxy/connections"
PARTNER = "https://partner.example"


@dataclass
class World:
    """A served proxy, an admin client, and a browser with its own cookie jar."""

    config: Config
    admin: aiohttp.ClientSession
    browser: aiohttp.ClientSession

    @property
    def main(self) -> str:
        return url_of(self.config)

    async def new_link(self, name: str, **fields: Any) -> str:
        """POST /_proxy/connections: the connect link."""
        async with self.admin.post(
            self.main + API, json={"name": name, **fields}, headers=admin_headers()
        ) as resp:
            body = await resp.json()
            assert resp.status in (200, 201), body
        url: str = body["authorize_url"]
        return url

    async def shown(self, name: str) -> dict[str, Any]:
        """GET /_proxy/connections/NAME."""
        status, body = await get_json(
            self.admin, f"{self.main}{API}/{name}", headers=admin_headers()
        )
        assert status == 200, body
        return body

    async def subject_via(self, name: str) -> str:
        """The subject Pleo sees on a request for connection `name` (by header)."""
        status, body = await get_json(
            self.admin, f"{self.main}/v1/introspect", headers={"X-Pleo-Connection": name}
        )
        assert status == 200, body
        subject: str = body["data"]["subjectURN"]
        return subject


def browser_session() -> aiohttp.ClientSession:
    # unsafe: the proxy is reached by name (localhost) and by IP; keep cookies for both.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT)


def a_config(
    sandbox: RunningSandbox,
    tmp_path: Path,
    names: list[tuple[str, int | None]] | None = None,
    *,
    link_ttl: float = 24 * 3600.0,
) -> Config:
    return connections_config(
        sandbox.url, tmp_path, names=names, return_to_origins=(PARTNER,), link_ttl=link_ttl
    )


@asynccontextmanager
async def world_of(config: Config) -> AsyncIterator[World]:
    await distinct_companies(sandbox_url(config), config)
    async with (
        serving(config),
        aiohttp.ClientSession(timeout=TIMEOUT) as admin,
        browser_session() as browser,
    ):
        yield World(config, admin, browser)


def sandbox_url(config: Config) -> str:
    return config.pleo.api_url


async def fetch(
    browser: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, str, str]:
    """(status, page name header, body) of one request, redirects not followed."""
    async with browser.request(method, url, allow_redirects=False, **kwargs) as resp:
        return resp.status, resp.headers.get(PAGE_HEADER, ""), await resp.text()


async def press_button(browser: aiohttp.ClientSession, link: str) -> str:
    """Open the link's page and submit its form as a browser would; Pleo's authorise URL."""
    status, page, body = await fetch(browser, "GET", link)
    assert (status, page) == (200, "authorise"), body
    form = re.search(r'<form method="post" action="([^"]+)">(.*?)</form>', body, re.S)
    assert form is not None
    fields = {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(
            r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form[2]
        )
    }
    parts = urlsplit(link)
    async with browser.post(
        f"{parts.scheme}://{parts.netloc}{html.unescape(form[1])}",
        data=fields,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def visit_pleo(browser: aiohttp.ClientSession, authorize_url: str) -> str:
    """Follow Pleo's authorise URL (auto-approve on); where Pleo sends the browser."""
    async with browser.get(authorize_url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def deny_at_pleo(browser: aiohttp.ClientSession, authorize_url: str) -> str:
    """Open the sandbox's consent page and press Deny; where Pleo sends the browser."""
    async with browser.get(authorize_url) as resp:
        assert resp.status == 200
        consent = await resp.text()
    match = re.search(r'name="request_id" value="([^"]+)"', consent)
    assert match is not None
    parts = urlsplit(authorize_url)
    async with browser.post(
        f"{parts.scheme}://{parts.netloc}/oauth/authorize/decision",
        data={"request_id": html.unescape(match[1]), "decision": "deny"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def connect(world: World, link: str) -> tuple[int, str, str]:
    """The whole flow from a link with auto-approve: the callback's answer."""
    callback = await visit_pleo(world.browser, await press_button(world.browser, link))
    return await fetch(world.browser, "GET", callback)


def code_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["setup"][0]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


async def test_a_link_opens_the_page_and_connects_its_connection_once(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        link = await world.new_link("acme")
        status, page, body = await fetch(world.browser, "GET", link)
        assert (status, page) == (200, "authorise")
        assert 'name="connection" value="acme"' in body
        status, page, body = await connect(world, link)
        assert (status, page) == (200, "connected")
        assert f"{world.main}/c/acme" in body, "the page names where applications send requests"
        (grant,) = await get_grants(sandbox.url)
        shown = await world.shown("acme")
        assert (shown["state"], shown["subject"]) == ("authorised", grant["subject"])
        assert await world.subject_via("acme") == grant["subject"]
        # One use: the link is closed now, for the page and for its form.
        for method in ("GET", "POST"):
            data = {"setup": code_of(link), "connection": "acme"}
            status, page, _ = await fetch(world.browser, method, link, data=data)
            assert (status, page) == (410, "already_connected"), method
        assert len(await get_grants(sandbox.url)) == 1


async def test_a_link_made_by_another_process_connects(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """`registry.issue_link` elsewhere (as `pleo-proxy connect` does): the running proxy
    reads the link from the store when the page is opened."""
    config = a_config(sandbox, tmp_path)
    async with world_of(config) as world:
        issued: list[IssuedLink] = []

        async def issue(registry: Registry) -> int:
            issued.append(await registry.issue_link("elsewhere"))
            return 0

        await with_registry(config, issue)
        assert issued[0].created
        link = url_with_code(config, "elsewhere", issued[0].code)
        assert (await connect(world, link))[:2] == (200, "connected")
        (grant,) = await get_grants(sandbox.url)
        assert await world.subject_via("elsewhere") == grant["subject"]


async def test_a_new_link_replaces_the_older_one(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        old = await world.new_link("acme")
        new = await world.new_link("acme")
        status, page, _ = await fetch(world.browser, "GET", old)
        assert (status, page) == (403, "setup_code_invalid")
        assert (await connect(world, new))[:2] == (200, "connected")


class FakeClock:
    """Time the test advances by hand; starts now, so the sandbox's tokens make sense."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def clocked_world(config: Config, clock: Callable[[], float]) -> AsyncIterator[World]:
    """The proxy's app on its port, its time from `clock` (`serve()` takes no clock)."""
    await distinct_companies(sandbox_url(config), config)
    runner = web.AppRunner(build_app(config, clock=clock), **runner_options(config))
    await runner.setup()
    try:
        await web.TCPSite(runner, config.listen.host, config.listen.port).start()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as admin, browser_session() as browser:
            yield World(config, admin, browser)
    finally:
        await runner.cleanup()


async def test_an_expired_link_is_410_and_a_new_one_works(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    clock = FakeClock()
    config = a_config(sandbox, tmp_path, link_ttl=60)
    async with clocked_world(config, clock) as world:
        link = await world.new_link("acme", return_to=f"{PARTNER}/done")
        assert (await fetch(world.browser, "GET", link))[:2] == (200, "authorise")
        clock.now += 61
        for method in ("GET", "POST"):
            data = {"setup": code_of(link), "connection": "acme"}
            status, page, body = await fetch(world.browser, method, link, data=data)
            # A page, not a redirect to return_to: the link's own holder must read it.
            assert (status, page) == (410, "link_expired"), method
            assert "This connect link has expired" in body
            assert "Ask whoever sent it for a new link" in body
            assert code_of(link) not in body
            assert "<form" not in body
        assert not list(world.browser.cookie_jar), "no flow was started"
        assert (await world.shown("acme"))["state"] == "unauthorised"
        fresh = await world.new_link("acme")
        status, page, _ = await connect(world, fresh)
        assert (status, page) == (200, "connected")
        assert (await world.shown("acme"))["state"] == "authorised"


async def test_wrong_codes_and_unknown_connections_are_refused(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        link = await world.new_link("acme")
        other = await world.new_link("other")
        page_url = link.split("?", 1)[0]
        cases = [
            ({"connection": "acme", "setup": "not-the-code"}, 403, "setup_code_invalid"),
            ({"connection": "acme"}, 403, "setup_code_invalid"),
            # A link's code opens only its own connection's page.
            ({"connection": "acme", "setup": code_of(other)}, 403, "setup_code_invalid"),
            ({"connection": "nosuch", "setup": code_of(link)}, 404, "unknown_connection"),
            ({"connection": "No Such", "setup": code_of(link)}, 404, "unknown_connection"),
        ]
        for params, status, name in cases:
            got = await fetch(world.browser, "GET", page_url, params=params)
            assert got[:2] == (status, name), params
            assert code_of(link) not in got[2]
            got = await fetch(world.browser, "POST", page_url, data=params)
            assert got[:2] == (status, name), params
        assert not list(world.browser.cookie_jar), "no flow was started"
        assert (await fetch(world.browser, "GET", link))[:2] == (200, "authorise")


async def test_return_to_gets_the_connected_result(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        link = await world.new_link("acme", return_to=f"{PARTNER}/done?x=1")
        callback = await visit_pleo(world.browser, await press_button(world.browser, link))
        async with world.browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
        assert location.startswith(f"{PARTNER}/done?")
        assert query_of(location) == {"x": ["1"], "connection": ["acme"], "result": ["connected"]}
        assert (await world.shown("acme"))["state"] == "authorised"


async def test_return_to_gets_the_denied_result(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        await set_knobs(sandbox.url, auto_approve=False)
        link = await world.new_link("acme", return_to=f"{PARTNER}/done")
        callback = await deny_at_pleo(world.browser, await press_button(world.browser, link))
        assert query_of(callback)["error"] == ["access_denied"]
        async with world.browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
        assert location.startswith(f"{PARTNER}/done?")
        assert query_of(location) == {"connection": ["acme"], "result": ["denied"]}
        assert (await world.shown("acme"))["state"] == "unauthorised"
        assert await get_grants(sandbox.url) == []
        # A refusal does not use the link up: the customer may change their mind.
        assert (await fetch(world.browser, "GET", link))[:2] == (200, "authorise")


async def test_return_to_gets_the_error_result(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        await set_knobs(sandbox.url, token_failures=1, token_failure_mode="503")
        link = await world.new_link("acme", return_to=f"{PARTNER}/done")
        callback = await visit_pleo(world.browser, await press_button(world.browser, link))
        async with world.browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 303
            assert query_of(resp.headers["Location"])["result"] == ["error"]
        assert (await world.shown("acme"))["state"] == "unauthorised"


async def test_return_to_outside_the_allow_list_is_refused_at_creation(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        for return_to in ("https://evil.example/done", f"{PARTNER}.evil.example/done"):
            async with world.admin.post(
                world.main + API,
                json={"name": "acme", "return_to": return_to},
                headers=admin_headers(),
            ) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"] == "return_to_not_allowed"
        status, body = await get_json(
            world.admin, f"{world.main}{API}/acme", headers=admin_headers()
        )
        assert (status, body["error"]) == (404, "unknown_connection")


async def test_one_callback_serves_every_connection_in_any_order(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world_of(a_config(sandbox, tmp_path, names=[("first", None)])) as world:
        first = await world.new_link("first")
        second = await world.new_link("second")
        # Both started in one browser before either completes: two flows, two cookies.
        to_pleo = [await press_button(world.browser, link) for link in (first, second)]
        assert len(list(world.browser.cookie_jar)) == 2
        callbacks = [await visit_pleo(world.browser, url) for url in to_pleo]
        assert {urlsplit(c).path for c in callbacks} == {"/_proxy/callback"}

        # Completed in reverse order: each grant goes to the connection that asked for it.
        assert (await fetch(world.browser, "GET", callbacks[1]))[:2] == (200, "connected")
        (for_second,) = await get_grants(sandbox.url)
        assert (await world.shown("first"))["state"] == "unauthorised"
        assert (await fetch(world.browser, "GET", callbacks[0]))[:2] == (200, "connected")
        grants = await get_grants(sandbox.url)
        assert len(grants) == 2
        assert grants[0]["id"] == for_second["id"]
        for_first = grants[1]
        assert for_first["subject"] != for_second["subject"]
        assert (await world.shown("second"))["subject"] == for_second["subject"]
        assert (await world.shown("first"))["subject"] == for_first["subject"]
        assert await world.subject_via("second") == for_second["subject"]
        assert await world.subject_via("first") == for_first["subject"]
        assert (await world.shown("first"))["company"] != (await world.shown("second"))["company"]


async def test_a_pending_flow_does_not_bring_back_a_deleted_connection(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world_of(a_config(sandbox, tmp_path)) as world:
        link = await world.new_link("gone")
        callback = await visit_pleo(world.browser, await press_button(world.browser, link))
        async with world.admin.delete(f"{world.main}{API}/gone", headers=admin_headers()) as resp:
            assert resp.status == 200
        status, page, _ = await fetch(world.browser, "GET", callback)
        assert page != "connected"
        assert status >= 400
        status, body = await get_json(
            world.admin, f"{world.main}{API}/gone", headers=admin_headers()
        )
        assert (status, body["error"]) == (404, "unknown_connection")
        assert not (tmp_path / "connections" / "gone.enc").exists()


def with_pages_listener(config: Config) -> Config:
    """The pages on their own port; Pleo sends the browser back there."""
    port = free_port()
    redirect = f"http://localhost:{port}/_proxy/callback"
    return replace(
        config,
        pages=Pages(host="127.0.0.1", port=port, public_url=None),
        pleo=replace(config.pleo, redirect_uri=redirect),
    )


async def test_the_pages_listener_serves_the_pages_and_nothing_else(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = with_pages_listener(a_config(sandbox, tmp_path))
    pages_port = config.pages.port
    async with world_of(config) as world:
        link = await world.new_link("acme")
        assert link.startswith(f"http://localhost:{pages_port}/_proxy/authorize?")
        assert (await connect(world, link))[:2] == (200, "connected")
        assert (await fetch(world.browser, "GET", link))[:2] == (410, "already_connected")
        (grant,) = await get_grants(sandbox.url)
        assert await world.subject_via("acme") == grant["subject"]

        before = (await get_stats(sandbox.url))["api_requests"]
        on_pages = f"http://127.0.0.1:{pages_port}"
        selector = {"X-Pleo-Connection": "acme"}
        for method, path, headers in (
            ("GET", "/v1/introspect", selector),
            ("POST", "/v1/introspect", selector),
            ("GET", "/c/acme/v1/introspect", {}),
            ("GET", "/_proxy/status", {}),
            ("GET", "/_proxy/metrics", {}),
            ("GET", "/_proxy/readyz", {}),
            ("GET", API, admin_headers()),
            ("GET", f"{API}/acme", admin_headers()),
            ("POST", API, admin_headers()),
        ):
            async with world.admin.request(
                method, on_pages + path, headers=headers, allow_redirects=False
            ) as resp:
                assert resp.status == 404, (method, path)
                assert resp.content_type == "application/json", (method, path)
                assert (await resp.json())["error"] == "not_found", (method, path)
        assert (await get_stats(sandbox.url))["api_requests"] == before

        # The main listener no longer serves the pages.
        for path in ("/_proxy/authorize", "/_proxy/callback"):
            status, body = await get_json(world.admin, world.main + path)
            assert (status, body["error"]) == (404, "not_found"), path
        status, _ = await get_json(world.admin, f"{world.main}{API}", headers=admin_headers())
        assert status == 200
