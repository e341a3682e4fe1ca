"""The authorise page and the callback, driven over HTTP against a real proxy and sandbox."""

from __future__ import annotations

import html
import logging
import re
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, Pleo
from proxy.connect.authorise import MAX_PENDING_FLOWS, Authoriser, read_authorize_url
from proxy.connect.pages import PAGE_HEADER
from proxy.connect.routes import AUTHORISER_KEY
from proxy.http.app import build_app
from proxy.http.keys import TOKENS_KEY
from proxy.lifecycle.manager import TokenManager, TokenState
from proxy.secret import Secret
from tests.flows import sandbox_config
from tests.sandboxes import RunningSandbox, sandbox, set_knobs

__all__ = ["sandbox"]

TIMEOUT = aiohttp.ClientTimeout(total=15)


class FakeClock:
    """Time the tests advance by hand (the proxy's flows expire by it)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    # The redirect URI must name the proxy's port before the proxy starts.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proxy:
    url: str
    app: web.Application
    config: Config

    @property
    def tokens(self) -> TokenManager:
        return self.app[TOKENS_KEY]

    @property
    def authoriser(self) -> Authoriser:
        return self.app[AUTHORISER_KEY]

    def state(self) -> TokenState:
        # A call, not a property: mypy must not narrow it across awaits.
        return self.tokens.state

    def setup_url(self) -> str:
        url = self.authoriser.setup_url()
        assert url is not None
        return url


def build_proxy_app(config: Config, clock: Callable[[], float]) -> web.Application:
    return build_app(config, clock=clock)


@asynccontextmanager
async def running_proxy(config: Config, clock: Callable[[], float]) -> AsyncIterator[Proxy]:
    app = build_proxy_app(config, clock)
    # No access log, as in production (logs.setup_logging silences it): aiohttp's request
    # line carries the callback's query, which the proxy's own logging must never hold.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port)
        await site.start()
        yield Proxy(f"http://{config.listen.host}:{config.listen.port}", app, config)
    finally:
        await runner.cleanup()


def proxy_config(sandbox_url: str, state_dir: Path, *, callback: bool = True) -> Config:
    """The proxy on a free loopback port; its redirect URI is its own callback, or elsewhere."""
    port = free_port()
    redirect = (
        f"http://127.0.0.1:{port}/_proxy/callback"
        if callback
        else f"http://127.0.0.1:{free_port()}/elsewhere"
    )
    return sandbox_config(sandbox_url, state_dir, port=port, redirect_uri=redirect)


@asynccontextmanager
async def connected_world(
    sandbox: RunningSandbox,
    tmp_path: Path,
    *,
    callback: bool = True,
    clock: Callable[[], float] | None = None,
    change: Callable[[Config], Config] = lambda c: c,
) -> AsyncIterator[tuple[Proxy, aiohttp.ClientSession]]:
    """A running proxy (unauthorised) against `sandbox`, and a browser-like client session."""
    config = change(proxy_config(sandbox.url, tmp_path, callback=callback))
    await set_knobs(sandbox.url, redirect_uris=[config.pleo.redirect_uri], auto_approve=True)
    async with (
        running_proxy(config, clock or FakeClock()) as proxy,
        aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT
        ) as browser,
    ):
        yield proxy, browser


async def press_button(proxy: Proxy, browser: aiohttp.ClientSession) -> str:
    """POST the page's form; the Location (Pleo's authorise URL) of the 302."""
    form = {"setup": parse_qs(urlsplit(proxy.setup_url()).query)["setup"][0]}
    async with browser.post(
        f"{proxy.url}/_proxy/authorize", data=form, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def visit_pleo(browser: aiohttp.ClientSession, authorize_url: str) -> str:
    """Follow Pleo's authorise URL (auto-approve on); the Location it sends the browser to."""
    async with browser.get(authorize_url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def fetch(
    browser: aiohttp.ClientSession, method: str, url: str, **kwargs: object
) -> tuple[int, str, str]:
    """(status, page name header, body) of one request, redirects not followed."""
    async with browser.request(method, url, allow_redirects=False, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, resp.headers.get(PAGE_HEADER, ""), await resp.text()


async def test_setup_url_file_is_private_and_readable_by_the_cli(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, _):
        path = tmp_path / "authorize-url"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        url = proxy.setup_url()
        assert path.read_text().strip() == url
        assert read_authorize_url(proxy.config) == url
        assert url.startswith(f"{proxy.url}/_proxy/authorize?setup=")
        assert proxy.authoriser.page_url() == f"{proxy.url}/_proxy/authorize"
        assert not list(tmp_path.glob(".authorize-url*")), "no temp file left behind"


async def test_page_shows_what_will_be_connected(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        async with browser.get(proxy.setup_url()) as resp:
            assert resp.status == 200
            body = await resp.text()
            headers = resp.headers
        pleo = proxy.config.pleo
        for shown in (pleo.client_id or "", pleo.redirect_uri, "sandbox", *pleo.scopes):
            assert html.escape(shown) in body
        assert '<form method="post" action="/_proxy/authorize">' in body
        assert 'name="redirect_url"' not in body, "no paste form when the callback is ours"
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert f"form-action 'self' {sandbox.url}" in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"
        assert headers["Cache-Control"] == "no-store"
        assert "<script" not in body


async def test_page_escapes_configured_values(sandbox: RunningSandbox, tmp_path: Path) -> None:
    def hostile(config: Config) -> Config:
        pleo = replace(config.pleo, scopes=("users:read", "<script>alert(1)</script>"))
        return replace(config, pleo=pleo)

    async with connected_world(sandbox, tmp_path, change=hostile) as (proxy, browser):
        status, _, body = await fetch(browser, "GET", proxy.setup_url())
        assert status == 200
        assert "<script>" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


@pytest.mark.parametrize("query", ["", "?setup=", "?setup=wrong", "?setup=a&setup=b"])
async def test_page_refused_without_the_setup_code(
    sandbox: RunningSandbox, tmp_path: Path, query: str
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        status, page, body = await fetch(browser, "GET", f"{proxy.url}/_proxy/authorize{query}")
        assert (status, page) == (403, "setup_code_invalid")
        setup = parse_qs(urlsplit(proxy.setup_url()).query)["setup"][0]
        assert setup not in body
        status, page, _ = await fetch(
            browser, "POST", f"{proxy.url}/_proxy/authorize", data={"setup": "wrong"}
        )
        assert (status, page) == (403, "setup_code_invalid")


async def test_button_redirects_to_pleo_with_pkce_and_a_lax_cookie(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        form = {"setup": parse_qs(urlsplit(proxy.setup_url()).query)["setup"][0]}
        async with browser.post(
            f"{proxy.url}/_proxy/authorize", data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 302
            location = resp.headers["Location"]
            cookies = resp.headers.getall("Set-Cookie")
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{sandbox.url}/oauth/authorize"
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert params["response_type"] == "code"
        assert params["client_id"] == "sandbox-client"
        assert params["redirect_uri"] == proxy.config.pleo.redirect_uri
        assert params["scope"] == " ".join(proxy.config.pleo.scopes)
        assert params["code_challenge_method"] == "S256"
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", params["code_challenge"])
        assert len(params["state"]) >= 32
        assert len(cookies) == 1
        attributes = [a.strip().lower() for a in cookies[0].split(";")]
        assert "httponly" in attributes
        assert "samesite=lax" in attributes
        assert "path=/_proxy/" in attributes
        assert "max-age=600" in attributes
        assert "secure" not in attributes, "plain http redirect URI: no Secure"
        assert params["state"] not in cookies[0], "the cookie is a separate binding value"


async def test_https_redirect_uri_makes_the_cookie_secure(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    def https(config: Config) -> Config:
        redirect = f"https://localhost:{config.listen.port}/_proxy/callback"
        return replace(config, pleo=replace(config.pleo, redirect_uri=redirect))

    async with connected_world(sandbox, tmp_path, change=https) as (proxy, browser):
        assert proxy.setup_url().startswith(f"https://localhost:{proxy.config.listen.port}/")
        setup = parse_qs(urlsplit(proxy.setup_url()).query)["setup"][0]
        async with browser.post(
            f"{proxy.url}/_proxy/authorize", data={"setup": setup}, allow_redirects=False
        ) as resp:
            assert resp.status == 302
            attributes = [a.strip().lower() for a in resp.headers["Set-Cookie"].split(";")]
        assert "secure" in attributes


async def test_pending_flows_are_bounded_oldest_first(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        states = []
        for _ in range(MAX_PENDING_FLOWS + 1):
            location = await press_button(proxy, browser)
            states.append(parse_qs(urlsplit(location).query)["state"][0])
        callback = f"{proxy.url}/_proxy/callback"
        oldest = {"state": states[0], "code": "x" * 20}
        assert (await fetch(browser, "GET", callback, params=oldest))[:2] == (400, "state_unknown")
        # The newest is still pending: it passes the state checks and reaches Pleo, which
        # refuses the made-up code.
        newest = {"state": states[-1], "code": "not-a-code-pleo-issued"}
        status, page, _ = await fetch(browser, "GET", callback, params=newest)
        assert (status, page) == (400, "code_refused")
        assert proxy.state() is TokenState.UNAUTHORISED


async def test_head_does_not_use_up_the_flow(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        async with browser.head(callback, allow_redirects=False) as resp:
            assert resp.status == 405
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")


async def test_full_flow_connects_and_closes_the_page(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        setup_url = proxy.setup_url()
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        assert callback.startswith(proxy.config.pleo.redirect_uri + "?")
        status, page, body = await fetch(browser, "GET", callback)
        assert (status, page) == (200, "connected")
        assert "Connected to Sandbox Company ApS" in body
        assert proxy.url in body
        assert proxy.state() is TokenState.AUTHORISED
        assert proxy.tokens.status()["company"] == "Sandbox Company ApS"
        assert not (tmp_path / "authorize-url").exists()
        assert read_authorize_url(proxy.config) is None
        assert proxy.authoriser.setup_url() is None
        for method in ("GET", "POST"):
            status, page, body = await fetch(browser, method, setup_url, data={"setup": "x"})
            assert (status, page) == (410, "already_connected")
            assert "pleo-proxy logout" in body
        async with browser.get(f"{proxy.url}/v1/introspect") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["companyName"] == "Sandbox Company ApS"


async def test_consent_page_approve_then_deny_in_a_second_attempt(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        await set_knobs(sandbox.url, auto_approve=False)
        setup_url = proxy.setup_url()
        callback = await decide_at_pleo(browser, await press_button(proxy, browser), "deny")
        assert parse_qs(urlsplit(callback).query)["error"] == ["access_denied"]
        status, page, body = await fetch(browser, "GET", callback)
        assert (status, page) == (403, "access_denied")
        assert html.escape(setup_url) in body, "a way back to start again"
        assert proxy.state() is TokenState.UNAUTHORISED
        assert read_authorize_url(proxy.config) == setup_url
        callback = await decide_at_pleo(browser, await press_button(proxy, browser), "approve")
        status, page, _ = await fetch(browser, "GET", callback)
        assert (status, page) == (200, "connected")
        assert proxy.state() is TokenState.AUTHORISED


async def decide_at_pleo(browser: aiohttp.ClientSession, authorize_url: str, decision: str) -> str:
    """Open the sandbox consent page and press Approve or Deny; where it sends the browser."""
    async with browser.get(authorize_url) as resp:
        assert resp.status == 200
        page = await resp.text()
    match = re.search(r'name="request_id" value="([^"]+)"', page)
    assert match is not None
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    async with browser.post(
        f"{origin}/oauth/authorize/decision",
        data={"request_id": html.unescape(match[1]), "decision": decision},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def test_replayed_callback_is_refused(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")
        before = proxy.tokens.tokens
        status, page, _ = await fetch(browser, "GET", callback)
        assert (status, page) == (400, "state_unknown")
        assert proxy.tokens.tokens is before, "tokens untouched by the replay"


async def test_state_without_the_cookie_is_refused_and_not_used_up(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        async with aiohttp.ClientSession(timeout=TIMEOUT) as stranger:
            status, page, _ = await fetch(stranger, "GET", callback)
        assert (status, page) == (400, "state_cookie_missing")
        assert proxy.state() is TokenState.UNAUTHORISED
        # The refusal did not burn the flow: the browser that started it can finish it.
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")


async def test_wrong_cookie_value_is_refused(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        names = [cookie.key for cookie in browser.cookie_jar]
        assert len(names) == 1
        async with aiohttp.ClientSession(timeout=TIMEOUT) as forger:
            forged = {"Cookie": f"{names[0]}=forged-value-of-the-right-name"}
            status, page, _ = await fetch(forger, "GET", callback, headers=forged)
        assert (status, page) == (400, "state_cookie_missing")
        assert proxy.state() is TokenState.UNAUTHORISED


async def test_expired_flow_is_refused(sandbox: RunningSandbox, tmp_path: Path) -> None:
    clock = FakeClock()
    async with connected_world(sandbox, tmp_path, clock=clock) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        clock.advance(601)
        status, page, _ = await fetch(browser, "GET", callback)
        assert (status, page) == (400, "state_unknown")
        assert proxy.state() is TokenState.UNAUTHORISED
        # The setup code itself does not expire: the person starts again.
        assert (await fetch(browser, "GET", proxy.setup_url()))[0] == 200


async def test_two_clicks_two_flows_either_completes(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        first = await press_button(proxy, browser)
        second = await press_button(proxy, browser)
        assert len(list(browser.cookie_jar)) == 2
        await visit_pleo(browser, second)
        callback = await visit_pleo(browser, first)
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")


async def test_missing_state_and_pleo_errors_are_pages(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        status, page, _ = await fetch(browser, "GET", f"{proxy.url}/_proxy/callback?code=abc")
        assert (status, page) == (400, "state_missing")
        authorize = await press_button(proxy, browser)
        state = parse_qs(urlsplit(authorize).query)["state"][0]
        query = {"state": state, "error": "<b>server_error</b>"}
        status, page, body = await fetch(
            browser, "GET", f"{proxy.url}/_proxy/callback", params=query
        )
        assert (status, page) == (400, "authorization_error")
        assert "<b>" not in body
        assert proxy.state() is TokenState.UNAUTHORISED


async def test_rejected_client_is_explained_and_changes_nothing(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    def wrong_secret(config: Config) -> Config:
        pleo: Pleo = replace(config.pleo, client_secret=Secret("not-the-secret"))
        return replace(config, pleo=pleo)

    async with connected_world(sandbox, tmp_path, change=wrong_secret) as (proxy, browser):
        setup_url = proxy.setup_url()
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        status, page, body = await fetch(browser, "GET", callback)
        assert (status, page) == (502, "client_rejected")
        assert "client_secret" in body
        assert proxy.state() is TokenState.UNAUTHORISED
        assert read_authorize_url(proxy.config) == setup_url


async def test_unreachable_token_endpoint_is_explained(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        await set_knobs(sandbox.url, token_failures=1, token_failure_mode="503")
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        status, page, _ = await fetch(browser, "GET", callback)
        assert (status, page) == (503, "token_endpoint_unavailable")
        assert proxy.state() is TokenState.UNAUTHORISED
        # The person starts again and it works (one attempt per click, no hidden retries).
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")


async def test_paste_flow_runs_the_same_checks(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path, callback=False) as (proxy, browser):
        assert proxy.setup_url().startswith(f"{proxy.url}/_proxy/authorize?setup=")
        status, _, body = await fetch(browser, "GET", proxy.setup_url())
        assert status == 200
        assert '<form method="post" action="/_proxy/callback">' in body
        landed = await visit_pleo(browser, await press_button(proxy, browser))
        assert landed.startswith(proxy.config.pleo.redirect_uri + "?")
        paste = f"{proxy.url}/_proxy/callback"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as stranger:
            refused = await fetch(stranger, "POST", paste, data={"redirect_url": landed})
        assert refused[:2] == (400, "state_cookie_missing")
        bad = await fetch(browser, "POST", paste, data={"redirect_url": "not a url at all"})
        assert bad[:2] == (400, "redirect_url_invalid")
        status, page, body = await fetch(browser, "POST", paste, data={"redirect_url": landed})
        assert (status, page) == (200, "connected")
        assert proxy.state() is TokenState.AUTHORISED
        replay = await fetch(browser, "POST", paste, data={"redirect_url": landed})
        assert replay[:2] == (400, "state_unknown")


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
async def test_cross_site_post_is_refused_by_the_guard(
    sandbox: RunningSandbox, tmp_path: Path, headers: dict[str, str]
) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        form = {"setup": parse_qs(urlsplit(proxy.setup_url()).query)["setup"][0]}
        async with browser.post(
            f"{proxy.url}/_proxy/authorize", data=form, headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "cross_site_request"
        assert not list(browser.cookie_jar), "no flow was started"
        status, _, _ = await fetch(
            browser,
            "POST",
            f"{proxy.url}/_proxy/callback",
            data={"redirect_url": "x"},
            headers=headers,
        )
        assert status == 403


async def test_callback_get_is_allowed_cross_site(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        status, page, _ = await fetch(browser, "GET", callback, headers=headers)
        assert (status, page) == (200, "connected")


async def test_logout_makes_a_new_setup_code(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        old = proxy.setup_url()
        callback = await visit_pleo(browser, await press_button(proxy, browser))
        assert (await fetch(browser, "GET", callback))[:2] == (200, "connected")
        await proxy.tokens.logout()
        new = read_authorize_url(proxy.config)
        assert new is not None
        assert new != old
        assert (await fetch(browser, "GET", old))[:2] == (403, "setup_code_invalid")
        assert (await fetch(browser, "GET", new))[0] == 200


async def test_no_secret_in_any_page_or_log(
    sandbox: RunningSandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    async with connected_world(sandbox, tmp_path) as (proxy, browser):
        authorize = await press_button(proxy, browser)
        state = parse_qs(urlsplit(authorize).query)["state"][0]
        bodies.append((await fetch(browser, "GET", proxy.setup_url()))[2])
        denied = await fetch(
            browser, "GET", f"{proxy.url}/_proxy/callback", params={"state": state, "error": "x"}
        )
        bodies.append(denied[2])
        authorize = await press_button(proxy, browser)
        callback = await visit_pleo(browser, authorize)
        query = parse_qs(urlsplit(callback).query)
        code, state = query["code"][0], query["state"][0]
        bodies.append((await fetch(browser, "GET", callback))[2])
        bodies.append((await fetch(browser, "GET", callback))[2])
        cookies = [c.value for c in browser.cookie_jar]
        tokens = proxy.tokens.tokens
        assert tokens is not None
        assert tokens.refresh_token is not None
        secrets = [code, state, tokens.access_token.reveal(), tokens.refresh_token.reveal()]
    secrets += cookies
    # aiohttp.access is only the sandbox's own log here (Pleo's side sees code and state).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert "proxy.authorise" in {r.name for r in caplog.records}, "the proxy's log was captured"
    for value in secrets:
        assert len(value) >= 16
        for body in bodies:
            assert value not in body
        assert value not in logged


def test_page_url_follows_the_callback_or_the_listen_address(tmp_path: Path) -> None:
    from dataclasses import replace

    from proxy.urls import authorise_page_url

    config = sandbox_config("http://127.0.0.1:9", tmp_path, port=18080)
    assert authorise_page_url(config) == "http://localhost:8080/_proxy/authorize"
    pasted = replace(
        config, pleo=replace(config.pleo, redirect_uri="https://pleo.example.com/return")
    )
    # Paste flow: Pleo returns elsewhere, so the page (and every 503 body) names the proxy.
    assert authorise_page_url(pasted) == "http://127.0.0.1:18080/_proxy/authorize"
