"""The guard: pure `check()` cases, and every refusal through a real proxy over raw sockets."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from aiohttp.test_utils import TestServer

from proxy.config import Config, Listen, Pleo
from proxy.http.guard import REFUSALS_KEY, Policy, RequestView, check
from tests.proxyproc import RawResponse, RecordingCredentials, proxy_config, raw_http, run_proxy_app
from tests.upstreams import EchoUpstream, run_echo_upstream

POLICY_CONFIG = Config(
    listen=Listen(
        host="127.0.0.1",
        port=8080,
        allowed_hosts=("proxy.internal", "sidecar:9000"),
        allowed_origins=("https://app.example.com",),
    ),
    pleo=Pleo(redirect_uri="http://localhost:8080/_proxy/callback"),
)
POLICY = Policy.from_config(POLICY_CONFIG)


def view(
    host: str | None = "127.0.0.1:8080",
    *,
    method: str = "GET",
    target: str = "/v1/expenses",
    origin: str | None = None,
    sec_fetch_site: str | None = None,
) -> RequestView:
    return RequestView(
        method=method,
        target=target,
        path=target.split("?")[0],
        hosts=() if host is None else (host,),
        origin=origin,
        sec_fetch_site=sec_fetch_site,
        local_port=8080,
    )


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:8080",
        "localhost",
        "LOCALHOST:8080",
        "[::1]",
        "[::1]:8080",
        "proxy.internal",
        "proxy.internal:8080",
        "sidecar:9000",
    ],
)
def test_allowed_hosts_pass(host: str) -> None:
    assert check(view(host), POLICY) is None


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example",
        "evil.example:8080",
        "localhost:9999",
        "127.0.0.1:80",
        "sidecar",
        "sidecar:9001",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8080",
        "::1",
        "[::1",
        "localhost:8080:1",
        "localhost:abc",
    ],
)
def test_other_hosts_are_refused(host: str | None) -> None:
    refusal = check(view(host), POLICY)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (421, "host_not_allowed")


def test_repeated_host_is_refused() -> None:
    repeated = RequestView("GET", "/v1", "/v1", ("localhost", "evil.example"), local_port=8080)
    refusal = check(repeated, POLICY)
    assert refusal is not None
    assert refusal.code == "host_not_allowed"


def test_the_port_actually_listened_on_is_allowed() -> None:
    # With `port: 0` the config cannot know the port; the connection's own port counts.
    assert check(replace(view("localhost:43210"), local_port=43210), POLICY) is None
    assert check(view("localhost:43210"), POLICY) is not None


@pytest.mark.parametrize(
    ("origin", "fetch_site"),
    [
        (None, None),
        (None, "same-origin"),
        (None, "none"),
        ("http://127.0.0.1:8080", "same-origin"),
        ("http://localhost:8080", None),  # the redirect URI's origin
        ("https://app.example.com", "cross-site"),
    ],
)
def test_same_origin_and_non_browser_requests_pass(
    origin: str | None, fetch_site: str | None
) -> None:
    decision = check(view(origin=origin, sec_fetch_site=fetch_site), POLICY)
    if fetch_site == "cross-site":
        # An allowed origin does not override the browser's own cross-site verdict.
        assert decision is not None
        assert decision.code == "cross_site_request"
    else:
        assert decision is None


@pytest.mark.parametrize(
    ("origin", "fetch_site"),
    [
        (None, "cross-site"),
        (None, "same-site"),
        (None, "CROSS-SITE"),
        ("null", None),
        ("https://evil.example", None),
        ("http://127.0.0.1:9999", None),
        ("https://127.0.0.1:8080", None),
        ("http://localhost:8080", "same-site"),
    ],
)
def test_cross_site_requests_are_refused(origin: str | None, fetch_site: str | None) -> None:
    refusal = check(view(origin=origin, sec_fetch_site=fetch_site), POLICY)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (403, "cross_site_request")


def test_own_origin_follows_the_listeners_scheme() -> None:
    """On a TLS listener the page's own origin is https://host: its POSTs are same-site."""
    post = view(method="POST", target="/_proxy/authorize", origin="https://127.0.0.1:8080")
    assert check(replace(post, scheme="https"), POLICY) is None
    refused = check(post, POLICY)  # the same origin on a plain-HTTP listener is foreign
    assert refused is not None
    assert refused.code == "cross_site_request"


def test_callback_get_is_exempt_from_the_cross_site_rule_only() -> None:
    target = "/_proxy/callback?code=x&state=y"
    callback = view(target=target, sec_fetch_site="cross-site", origin="https://auth.pleo.io")
    assert check(callback, POLICY) is None
    post = check(replace(callback, method="POST"), POLICY)
    assert post is not None
    assert post.code == "cross_site_request"
    # The Host rule still applies to the callback.
    wrong_host = check(replace(callback, hosts=("evil.example",)), POLICY)
    assert wrong_host is not None
    assert wrong_host.code == "host_not_allowed"


@pytest.mark.parametrize(
    ("method", "target", "status", "code"),
    [
        ("GET", "http://example.com/v1", 400, "absolute_form_not_allowed"),
        ("GET", "https://external.pleo.io/v1/expenses", 400, "absolute_form_not_allowed"),
        ("OPTIONS", "*", 400, "absolute_form_not_allowed"),
        ("CONNECT", "external.pleo.io:443", 405, "method_not_allowed"),
    ],
)
def test_proxy_forms_are_refused(method: str, target: str, status: int, code: str) -> None:
    refusal = check(view(method=method, target=target), POLICY)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (status, code)


# --- through a real proxy, over raw sockets (aiohttp's client cannot send these) ---


@dataclass
class Setup:
    proxy: TestServer
    upstream: EchoUpstream
    credentials: RecordingCredentials

    @property
    def port(self) -> int:
        assert self.proxy.port is not None
        return self.proxy.port

    def refusals(self) -> Counter[str]:
        return self.proxy.app[REFUSALS_KEY]

    async def send(self, request_line: str, *headers: str) -> RawResponse:
        lines = [request_line, *headers, "Connection: close", "", ""]
        return await raw_http(self.port, "\r\n".join(lines).encode())


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    credentials = RecordingCredentials()
    async with run_echo_upstream() as upstream:
        config = proxy_config(
            upstream.url, listen=Listen(port=0, allowed_origins=("https://ok.example",))
        )
        async with run_proxy_app(config, credentials) as proxy:
            yield Setup(proxy, upstream, credentials)


def assert_refused(setup: Setup, response: RawResponse, status: int, code: str) -> None:
    assert response.status == status
    assert response.json()["error"] == code
    assert "detail" in response.json()
    assert setup.refusals() == {code: 1}
    assert setup.upstream.hits == 0
    assert setup.credentials.calls == 0


@pytest.mark.parametrize(
    ("request_line", "headers", "status", "code"),
    [
        ("GET /v1/me HTTP/1.1", ["Host: evil.example"], 421, "host_not_allowed"),
        ("GET /v1/me HTTP/1.1", ["Host: evil.example:{port}"], 421, "host_not_allowed"),
        ("GET /v1/me HTTP/1.1", ["Host: localhost:1"], 421, "host_not_allowed"),
        ("GET /v1/me HTTP/1.0", [], 421, "host_not_allowed"),
        ("GET /_proxy/healthz HTTP/1.1", ["Host: evil.example"], 421, "host_not_allowed"),
        (
            "GET /v1/me HTTP/1.1",
            ["Host: localhost:{port}", "Origin: null"],
            403,
            "cross_site_request",
        ),
        (
            "POST /v1/expenses HTTP/1.1",
            ["Host: localhost:{port}", "Origin: https://evil.example", "Content-Length: 0"],
            403,
            "cross_site_request",
        ),
        (
            "GET /v1/me HTTP/1.1",
            ["Host: 127.0.0.1:{port}", "Sec-Fetch-Site: cross-site"],
            403,
            "cross_site_request",
        ),
        (
            "GET /v1/me HTTP/1.1",
            ["Host: 127.0.0.1:{port}", "Sec-Fetch-Site: same-site"],
            403,
            "cross_site_request",
        ),
        (
            "POST /_proxy/authorize HTTP/1.1",
            ["Host: localhost:{port}", "Sec-Fetch-Site: cross-site", "Content-Length: 0"],
            403,
            "cross_site_request",
        ),
        (
            "GET http://127.0.0.1:{port}/v1/me HTTP/1.1",
            ["Host: 127.0.0.1:{port}"],
            400,
            "absolute_form_not_allowed",
        ),
        ("GET https://example.com HTTP/1.1", ["Host: localhost"], 400, "absolute_form_not_allowed"),
        ("OPTIONS * HTTP/1.1", ["Host: localhost"], 400, "absolute_form_not_allowed"),
        (
            "CONNECT external.pleo.io:443 HTTP/1.1",
            ["Host: external.pleo.io:443"],
            405,
            "method_not_allowed",
        ),
        (
            "CONNECT 127.0.0.1:{port} HTTP/1.1",
            ["Host: 127.0.0.1:{port}"],
            405,
            "method_not_allowed",
        ),
    ],
)
async def test_refusals_over_the_wire(
    setup: Setup, request_line: str, headers: list[str], status: int, code: str
) -> None:
    response = await setup.send(
        request_line.format(port=setup.port), *(h.format(port=setup.port) for h in headers)
    )
    assert_refused(setup, response, status, code)


async def test_authority_form_never_reaches_upstream(setup: Setup) -> None:
    # aiohttp's parser rejects a non-CONNECT authority-form target itself (plain 400).
    response = await setup.send(f"GET 127.0.0.1:{setup.port} HTTP/1.1", "Host: localhost")
    assert response.status == 400
    assert setup.upstream.hits == 0
    assert setup.credentials.calls == 0


@pytest.mark.parametrize(
    "headers",
    [
        ["Host: 127.0.0.1:{port}"],
        ["Host: localhost"],
        ["Host: LocalHost:{port}"],
        ["Host: [::1]:{port}"],
        [
            "Host: localhost:{port}",
            "Origin: http://localhost:{port}",
            "Sec-Fetch-Site: same-origin",
        ],
        ["Host: localhost:{port}", "Origin: https://ok.example"],
        ["Host: localhost:{port}", "Sec-Fetch-Site: none"],
    ],
)
async def test_allowed_requests_are_forwarded(setup: Setup, headers: list[str]) -> None:
    response = await setup.send(
        "GET /v1/me HTTP/1.1", *(h.format(port=setup.port) for h in headers)
    )
    assert response.status == 200
    assert setup.upstream.hits == 1
    assert setup.refusals() == {}


async def test_callback_get_is_exempt_over_the_wire(setup: Setup) -> None:
    response = await setup.send(
        "GET /_proxy/callback?code=c&state=s HTTP/1.1",
        f"Host: localhost:{setup.port}",
        "Sec-Fetch-Site: cross-site",
        "Origin: https://auth.pleo.io",
    )
    # Not refused by the guard (the callback handler itself is not registered here).
    assert response.json()["error"] not in ("cross_site_request", "host_not_allowed")
    assert setup.refusals() == {}
    assert setup.upstream.hits == 0


async def test_refused_expect_request_gets_no_100_continue(setup: Setup) -> None:
    response = await setup.send(
        "POST /v1/uploads HTTP/1.1",
        "Host: evil.example",
        "Expect: 100-continue",
        "Content-Length: 1000000",
    )
    assert not response.head.startswith(b"HTTP/1.1 100")
    assert_refused(setup, response, 421, "host_not_allowed")


async def test_unknown_reserved_path_is_404_and_never_forwarded(setup: Setup) -> None:
    for method in ("GET", "POST"):
        response = await setup.send(
            f"{method} /_proxy/nope HTTP/1.1", f"Host: localhost:{setup.port}", "Content-Length: 0"
        )
        assert response.status == 404
        assert response.json()["error"] == "not_found"
    assert setup.upstream.hits == 0
    assert setup.credentials.calls == 0
