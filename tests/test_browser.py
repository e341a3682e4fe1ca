"""The authorise flow in a real headless Chromium: proxy on localhost, fake Pleo on 127.0.0.1.

The two hosts are different sites, so the cookie rules (SameSite=Lax on Pleo's redirect
back), the CSP's form-action on the 302 to Pleo, and the guard's cross-site rule are
exercised the way a browser applies them against the real Pleo.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, Request, async_playwright

from proxy.lifecycle.manager import TokenState
from tests.connect.test_authorise import TIMEOUT, FakeClock, Proxy, free_port, running_proxy
from tests.connections import (
    connections_config,
    distinct_companies,
    get_json,
    give_tokens,
    serving,
    url_of,
    write_connections_config,
)
from tests.flows import sandbox_config
from tests.processes import cli
from tests.sandboxes import RunningSandbox, sandbox, set_knobs

__all__ = ["sandbox"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEP_TIMEOUT_MS = 10_000
SCREENSHOT = Path("/tmp/pleo-proxy-authorise-page.png")
PHONE_SCREENSHOT = Path("/tmp/pleo-proxy-authorise-phone.png")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def world(sandbox: RunningSandbox, tmp_path: Path) -> AsyncIterator[tuple[Proxy, Page]]:
    """The proxy at http://localhost:<port> (its own callback) and a fresh browser page."""
    port = free_port()
    config = sandbox_config(
        sandbox.url, tmp_path, port=port, redirect_uri=f"http://localhost:{port}/_proxy/callback"
    )
    await set_knobs(sandbox.url, redirect_uris=[config.pleo.redirect_uri], auto_approve=False)
    async with running_proxy(config, FakeClock()) as proxy, chromium() as browser:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            yield proxy, page
        finally:
            await context.close()


def localhost_setup_url(proxy: Proxy) -> str:
    url = proxy.setup_url()
    assert url.startswith("http://localhost:")
    return url


async def test_browser_connects_through_the_consent_page(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world(sandbox, tmp_path) as (proxy, page):
        sent_to_pleo: list[dict[str, str]] = []

        async def record(request: Request) -> None:
            if request.url.startswith(sandbox.url):
                sent_to_pleo.append(await request.all_headers())

        page.on("request", record)
        response = await page.goto(localhost_setup_url(proxy))
        assert response is not None
        assert response.status == 200
        await page.get_by_role("heading", name="Connect this proxy to Pleo").wait_for()
        await page.screenshot(path=str(SCREENSHOT), full_page=True)

        await page.get_by_role("button", name="Continue to Pleo").click()
        await page.wait_for_url(f"{sandbox.url}/oauth/authorize?**")
        await page.get_by_role("button", name="Approve").click()

        await page.get_by_role("heading", name="Connected to Sandbox Company ApS").wait_for()
        assert page.url.startswith(proxy.config.pleo.redirect_uri + "?")
        assert proxy.state() is TokenState.AUTHORISED
        assert sent_to_pleo, "the browser went to Pleo"
        for headers in sent_to_pleo:
            assert "setup=" not in headers.get("referer", ""), "the setup code stays home"
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as client,
            client.get(f"http://localhost:{proxy.config.listen.port}/v1/introspect") as resp,
        ):
            assert resp.status == 200

        # The same callback address again (reload, history, a shared link): refused.
        replay = await page.goto(page.url)
        assert replay is not None
        assert replay.status == 400
        await page.get_by_role(
            "heading", name="This sign-in has expired or was already used"
        ).wait_for()


async def test_browser_deny_changes_nothing(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world(sandbox, tmp_path) as (proxy, page):
        await page.goto(localhost_setup_url(proxy))
        await page.get_by_role("button", name="Continue to Pleo").click()
        await page.get_by_role("button", name="Deny").click()
        await page.get_by_role("heading", name="Access was not granted").wait_for()
        assert proxy.state() is TokenState.UNAUTHORISED
        # The page offers the way back, and the setup code still works.
        await page.get_by_role("link", name="Start again").click()
        await page.get_by_role("button", name="Continue to Pleo").wait_for()


async def test_browser_without_the_setup_code_is_refused(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with world(sandbox, tmp_path) as (proxy, page):
        response = await page.goto(proxy.authoriser.page_url())
        assert response is not None
        assert response.status == 403
        await page.get_by_role("heading", name="This link is not valid").wait_for()


async def test_browser_page_fits_a_phone(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with world(sandbox, tmp_path) as (proxy, page):
        await page.set_viewport_size({"width": 360, "height": 740})
        await page.goto(localhost_setup_url(proxy))
        await page.screenshot(path=str(PHONE_SCREENSHOT), full_page=True)
        # No sideways scrolling: the long return address wraps instead.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360
        button = await page.get_by_role("button", name="Continue to Pleo").bounding_box()
        assert button is not None
        assert button["width"] >= 300, "a full-width, easy to tap button"


@asynccontextmanager
async def attacker_site(target: str, setup_code: str) -> AsyncIterator[str]:
    """A page on another site (127.0.0.1, not localhost) whose button POSTs to the proxy."""
    markup = (
        "<!doctype html><title>win a prize</title>"
        f'<form method="post" action="{target}">'
        f'<input type="hidden" name="setup" value="{setup_code}">'
        "<button>Claim</button></form>"
    )

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=markup, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/_proxy/authorize", "/_proxy/callback"])
async def test_browser_cross_site_form_post_is_refused(
    sandbox: RunningSandbox, tmp_path: Path, path: str
) -> None:
    async with world(sandbox, tmp_path) as (proxy, page):
        setup_code = localhost_setup_url(proxy).split("setup=", 1)[1]
        target = f"http://localhost:{proxy.config.listen.port}{path}"
        # Even an attacker who somehow had the setup code gets nowhere from another site.
        async with attacker_site(target, setup_code) as evil:
            await page.goto(evil)
            async with page.expect_navigation() as navigation:
                await page.get_by_role("button", name="Claim").click()
            response = await navigation.value
            assert response is not None
            assert response.status == 403
            assert (await response.json())["error"] == "cross_site_request"
        assert not await page.context.cookies(), "no flow was started"
        assert proxy.state() is TokenState.UNAUTHORISED


async def test_a_connection_made_while_traffic_flows_is_connected_in_the_browser(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """`pleo-proxy connect` in another process while the proxy serves another customer;
    the customer opens the link in Chromium, consents at Pleo, and the new connection
    serves at once: no restart, and the traffic in the meantime never failed."""
    config = connections_config(sandbox.url, tmp_path, names=[("existing", None)])
    await distinct_companies(sandbox.url, config)
    await give_tokens(config, ["existing"])
    await set_knobs(sandbox.url, auto_approve=False)  # the customer consents by hand
    config_file = write_connections_config(tmp_path / "c.yaml", config)
    main = url_of(config).replace("127.0.0.1", "localhost")
    statuses: Counter[int] = Counter()
    stop_traffic = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            while not stop_traffic.is_set():
                async with client.get(f"{main}/c/existing/v1/introspect") as resp:
                    statuses[resp.status] += 1

    async with serving(config), chromium() as browser:
        flowing = asyncio.create_task(traffic())
        try:
            code, out, err = await asyncio.to_thread(
                cli, "connect", "newcustomer", "--config", str(config_file)
            )
            assert code == 0, err
            context = await browser.new_context()
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            response = await page.goto(out.strip())
            assert response is not None
            assert response.status == 200
            await page.get_by_role("button", name="Continue to Pleo").click()
            await page.get_by_role("button", name="Approve").click()
            await page.get_by_role("heading", name=re.compile("^Connected to ")).wait_for()
            await expect_text(page, f"{url_of(config)}/c/newcustomer")
            await context.close()
            async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
                status, body = await get_json(
                    client,
                    f"{main}/v1/introspect",
                    headers={"X-Pleo-Connection": "newcustomer"},
                )
                assert status == 200, body
                _, existing = await get_json(client, f"{main}/c/existing/v1/introspect")
            assert body["data"]["subjectURN"] != existing["data"]["subjectURN"]
        finally:
            stop_traffic.set()
            await flowing
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 10


async def expect_text(page: Page, text: str) -> None:
    await page.get_by_text(text).first.wait_for()
