"""Client keys: the pure matching, then every refusal through a real proxy (refused, counted,
never forwarded, the body never read), both headers stripped, a listener beyond loopback
(`0.0.0.0`, reached via 127.0.0.1), keys limited to connections against the sandbox, and
rotation with a real SIGHUP to `pleo-proxy run`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.config import ClientKey, Config, Pages, Pleo
from proxy.errors import ProxyError
from proxy.http.client_keys import EXEMPT_PATHS, KeyProblem, KeyRing, Scope, admit, presented_key
from proxy.http.guard import REFUSALS_KEY
from proxy.http.serve import ListenError, check_client_keys, serve
from proxy.secret import Secret
from tests.connections import admin_headers, connections_config, give_tokens, serving
from tests.processes import PLEO_PROXY, free_port, stop, wait_for, write_config
from tests.proxyproc import (
    RawResponse,
    RecordingCredentials,
    proxy_config,
    raw_http,
    run_proxy_app,
    run_served,
)
from tests.sandboxes import RunningSandbox, get_stats, sandbox
from tests.upstreams import EchoUpstream, run_echo_upstream

__all__ = ["sandbox"]

KEY = "all-connections-key-0123456789"
ACME_KEY = "acme-only-key-0123456789abcdef"
WRONG = "not-a-configured-key-0123456789"
KEYS = (ClientKey(Secret(KEY)), ClientKey(Secret(ACME_KEY), connections=("acme",)))


def secrets(*values: str) -> tuple[Secret, ...]:
    return tuple(Secret(v) for v in values)


# --- the pure core ---


@pytest.mark.parametrize(
    ("authorization", "key_headers", "expected"),
    [
        ((), (), KeyProblem.REQUIRED),
        ((f"Bearer {KEY}",), (), KEY),
        ((f"bearer   {KEY}  ",), (), KEY),
        ((), (KEY,), KEY),
        ((), (f"  {KEY} ",), KEY),
        ((f"Basic {KEY}",), (), KeyProblem.INVALID),
        (("Bearer",), (), KeyProblem.INVALID),
        (("Bearer   ",), (), KeyProblem.INVALID),
        ((), ("",), KeyProblem.INVALID),
        ((f"Bearer {KEY}",), (KEY,), KeyProblem.INVALID),  # both headers: ambiguous
        ((), (KEY, KEY), KeyProblem.INVALID),
        ((f"Bearer {KEY}", f"Bearer {KEY}"), (), KeyProblem.INVALID),
    ],
)
def test_the_presented_key(
    authorization: tuple[str, ...], key_headers: tuple[str, ...], expected: str | KeyProblem
) -> None:
    found = presented_key(secrets(*authorization), secrets(*key_headers))
    if isinstance(expected, KeyProblem):
        assert found is expected
    else:
        assert isinstance(found, Secret)
        assert found.reveal() == expected


def test_the_ring_matches_a_key_to_its_scope() -> None:
    ring = KeyRing.of(KEYS)
    assert ring.enabled
    assert not KeyRing.of(()).enabled
    assert ring.match(Secret(KEY)) == Scope(None)
    assert ring.match(Secret(ACME_KEY)) == Scope(frozenset({"acme"}))
    assert ring.match(Secret(WRONG)) is None
    assert ring.match(Secret(KEY[:-1])) is None
    assert ring.match(Secret(KEY + "x")) is None


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: as many constant-time comparisons for the first key, the last, or none."""
    ring = KeyRing.of(ClientKey(Secret(f"key-number-{i:02d}-0123456789")) for i in range(8))
    calls: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in ("key-number-00-0123456789", "key-number-07-0123456789", WRONG, "k"):
        calls.clear()
        ring.match(Secret(presented))
        # Digests, so every comparison is of two 32-byte values whatever was sent.
        assert calls == [(32, 32)] * 8


def test_scopes() -> None:
    assert Scope(None).allows("acme")
    assert Scope(None).allows(None)
    limited = Scope(frozenset({"acme"}))
    assert limited.allows("acme")
    assert not limited.allows("beta")
    assert not limited.allows(None)  # every connection at once


def test_exempt_paths_and_keys_off() -> None:
    ring = KeyRing.of(KEYS)
    for path in EXEMPT_PATHS:
        assert admit(ring, path, (), ()) is None
    assert admit(ring, "/_proxy/status", (), ()) is KeyProblem.REQUIRED
    assert admit(ring, "/_proxy/healthz/", (), ()) is KeyProblem.REQUIRED
    assert admit(ring, "/c/acme/_proxy/readyz", (), ()) is KeyProblem.REQUIRED
    assert admit(KeyRing(), "/v1/expenses", (), ()) is None
    assert admit(ring, "/v1/x", (), secrets(WRONG)) is KeyProblem.INVALID
    assert admit(ring, "/v1/x", (), secrets(ACME_KEY)) == Scope(frozenset({"acme"}))


# --- through a real proxy (API-key style credentials: one connection, `default`) ---


@dataclass
class Setup:
    proxy: TestServer
    upstream: EchoUpstream
    credentials: RecordingCredentials

    @property
    def port(self) -> int:
        assert self.proxy.port is not None
        return self.proxy.port

    def refusals(self) -> dict[str, int]:
        return {k: v for k, v in self.proxy.app[REFUSALS_KEY].items() if v}

    async def send(self, request_line: str, *headers: str) -> RawResponse:
        lines = [request_line, f"Host: 127.0.0.1:{self.port}", *headers, "Connection: close"]
        return await raw_http(self.port, "\r\n".join([*lines, "", ""]).encode())


def keyed(config: Config, keys: tuple[ClientKey, ...] = KEYS) -> Config:
    return replace(config, listen=replace(config.listen, client_keys=keys))


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    credentials = RecordingCredentials()
    async with run_echo_upstream() as upstream:
        # API-key mode (no authorise page), with credentials that count their use.
        pleo = Pleo(api_url=upstream.url, api_key=Secret("pleo-api-key"))
        config = keyed(proxy_config(upstream.url, pleo=pleo))
        async with run_proxy_app(config, credentials) as proxy:
            yield Setup(proxy, upstream, credentials)


def assert_refused(setup: Setup, response: RawResponse, status: int, code: str) -> None:
    assert (response.status, response.json()["error"]) == (status, code)
    assert setup.refusals() == {code: 1}
    assert setup.upstream.hits == 0
    assert setup.credentials.calls == 0


# A POST whose body is announced and never sent: an answer shows it was not waited for.
UNSENT_BODY = ("POST /v1/expenses HTTP/1.1", "Content-Length: 1000000")


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ((), "client_key_required"),
        ((f"X-Proxy-Key: {WRONG}",), "client_key_invalid"),
        ((f"Proxy-Authorization: Bearer {WRONG}",), "client_key_invalid"),
        ((f"Proxy-Authorization: Basic {KEY}",), "client_key_invalid"),
        ((f"Proxy-Authorization: Bearer {KEY}", f"X-Proxy-Key: {KEY}"), "client_key_invalid"),
        ((f"X-Proxy-Key: {KEY}", f"X-Proxy-Key: {WRONG}"), "client_key_invalid"),
        ((f"Authorization: Bearer {KEY}",), "client_key_required"),  # not where keys go
    ],
)
async def test_no_key_or_a_wrong_key_is_refused_unread_and_never_forwarded(
    setup: Setup, headers: tuple[str, ...], code: str
) -> None:
    response = await setup.send(*UNSENT_BODY, *headers)
    assert_refused(setup, response, 401, code)
    assert b'WWW-Authenticate: Bearer realm="pleo-auth-proxy"' in response.head
    assert KEY not in response.body.decode()
    assert WRONG not in response.body.decode()


async def test_a_key_limited_to_another_connection_is_refused_unread(setup: Setup) -> None:
    response = await setup.send(*UNSENT_BODY, f"X-Proxy-Key: {ACME_KEY}")
    assert_refused(setup, response, 403, "connection_not_allowed")
    assert response.json()["detail"] == "this client key may not use the connection 'default'"


@pytest.mark.parametrize(
    "header", [f"Proxy-Authorization: Bearer {KEY}", f"X-Proxy-Key: {KEY}", f"x-proxy-key: {KEY}"]
)
async def test_both_headers_work_and_neither_is_forwarded(setup: Setup, header: str) -> None:
    response = await setup.send("GET /v1/expenses?page=2 HTTP/1.1", header)
    assert response.status == 200
    (seen,) = setup.upstream.seen
    assert seen.raw_path == "/v1/expenses?page=2"
    names = {name.decode().lower() for name, _ in seen.raw_headers}
    assert "proxy-authorization" not in names
    assert "x-proxy-key" not in names
    assert not any(KEY.encode() in name + value for name, value in seen.raw_headers)
    assert seen.authorization == "Bearer token-1"
    assert setup.refusals() == {}


async def test_a_key_limited_to_the_connection_passes() -> None:
    async with run_echo_upstream() as upstream:
        limited = (ClientKey(Secret(ACME_KEY), connections=("acme", "default")),)
        config = keyed(proxy_config(upstream.url), limited)
        async with run_proxy_app(config, RecordingCredentials()) as proxy:
            assert proxy.port is not None
            request = f"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Proxy-Key: {ACME_KEY}\r\n"
            response = await raw_http(proxy.port, (request + "Connection: close\r\n\r\n").encode())
            assert response.status == 200
            assert upstream.hits == 1


async def test_without_keys_the_key_headers_are_still_dropped() -> None:
    async with (
        run_echo_upstream() as upstream,
        run_proxy_app(proxy_config(upstream.url), RecordingCredentials()) as proxy,
    ):
        assert proxy.port is not None
        request = (
            "GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Proxy-Key: {KEY}\r\nProxy-Authorization: Bearer {KEY}\r\n"
            "Connection: close\r\n\r\n"
        )
        assert (await raw_http(proxy.port, request.encode())).status == 200
        names = {name.lower() for name, _ in upstream.seen[0].raw_headers}
        assert not {b"x-proxy-key", b"proxy-authorization"} & names


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("GET /_proxy/healthz HTTP/1.1", 200),
        # API-key mode has no authorise page: still ours, a 404, never forwarded.
        ("GET /_proxy/authorize HTTP/1.1", 404),
        ("GET /_proxy/callback?code=x&state=y HTTP/1.1", 404),
    ],
)
async def test_exempt_paths_need_no_key_and_are_never_forwarded(
    setup: Setup, request_line: str, status: int
) -> None:
    response = await setup.send(request_line)
    assert response.status == status
    assert setup.upstream.hits == 0
    assert setup.refusals() == {}


@pytest.mark.parametrize(
    "path", ["/_proxy/status", "/_proxy/readyz", "/_proxy/metrics", "/_proxy/nope", "/c/x/v1/a"]
)
async def test_the_other_reserved_paths_need_a_key(setup: Setup, path: str) -> None:
    response = await setup.send(f"GET {path} HTTP/1.1")
    assert_refused(setup, response, 401, "client_key_required")


async def test_limited_keys_and_process_wide_endpoints(setup: Setup) -> None:
    assert (await setup.send("GET /_proxy/status HTTP/1.1", f"X-Proxy-Key: {KEY}")).status == 200
    # API-key mode: status describes `default`, which the acme key may not see.
    status = await setup.send("GET /_proxy/status HTTP/1.1", f"X-Proxy-Key: {ACME_KEY}")
    assert (status.status, status.json()["error"]) == (403, "connection_not_allowed")
    metrics = await setup.send("GET /_proxy/metrics HTTP/1.1", f"X-Proxy-Key: {ACME_KEY}")
    assert metrics.status == 403
    assert metrics.json()["detail"] == (
        "this client key is limited to some connections; this endpoint covers all"
    )
    await setup.send("GET /v1/x HTTP/1.1")
    await setup.send("GET /v1/x HTTP/1.1", f"X-Proxy-Key: {WRONG}")
    scrape = await setup.send("GET /_proxy/metrics HTTP/1.1", f"X-Proxy-Key: {KEY}")
    text = scrape.body.decode()
    for reason, count in (
        ("client_key_required", 1),
        ("client_key_invalid", 1),
        ("connection_not_allowed", 2),
    ):
        assert f'pleo_proxy_guard_refusals_total{{reason="{reason}"}} {count}.0' in text
    assert setup.upstream.hits == 0


async def test_no_key_reaches_a_log_line(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await setup.send("GET /v1/x HTTP/1.1", f"X-Proxy-Key: {WRONG}")
    await setup.send("GET /v1/x HTTP/1.1", f"Proxy-Authorization: Bearer {KEY}")
    await setup.send("GET /v1/x HTTP/1.1", f"X-Proxy-Key: {ACME_KEY}")
    logged = "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
    assert logged  # the access log ran
    for key in (KEY, ACME_KEY, WRONG):
        assert key not in logged


# --- beyond loopback: serve() on 0.0.0.0, reached via 127.0.0.1 ---


def everywhere(config: Config, **listen: Any) -> Config:
    return replace(config, listen=replace(config.listen, host="0.0.0.0", **listen))  # noqa: S104


async def test_a_listener_beyond_loopback_without_keys_refuses_to_start() -> None:
    async with run_echo_upstream() as upstream:
        port = free_port()
        config = everywhere(proxy_config(upstream.url), port=port)
        with pytest.raises(ProxyError) as info:
            await serve(config, credentials=RecordingCredentials(), stop=asyncio.Event())
        assert info.value.detail == (
            f"listening on 0.0.0.0:{port}, beyond loopback, needs listen.client_keys:"
            " without them anyone who reaches the port uses the Pleo connections"
        )
        # Refused before serving: the port is free again at once.
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", port))  # noqa: S104


def test_the_bound_sockets_decide_what_is_beyond_loopback(tmp_path: Path) -> None:
    """systemd may pass sockets whatever listen.host says: their real addresses count."""
    config = proxy_config("https://api.example")
    with contextlib.ExitStack() as stack:

        def bound(family: int, address: Any) -> socket.socket:
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind(address)
            return sock

        loopback = [bound(socket.AF_INET, ("127.0.0.2", 0)), bound(socket.AF_INET6, ("::1", 0))]
        local = [bound(socket.AF_UNIX, str(tmp_path / "proxy.sock"))]
        wide = bound(socket.AF_INET, ("0.0.0.0", 0))  # noqa: S104
        assert check_client_keys(config, loopback + local, []) is False
        # The pages listener (no connection name) is exempt; a connection's port is not.
        assert check_client_keys(config, loopback, [(None, [wide])]) is False
        with pytest.raises(ListenError):
            check_client_keys(config, loopback, [("acme", [wide])])
        with pytest.raises(ListenError):
            check_client_keys(config, [wide], [])
        assert check_client_keys(keyed(config), [wide], []) is True


async def test_beyond_loopback_with_keys_every_request_needs_one() -> None:
    credentials = RecordingCredentials()
    async with run_echo_upstream() as upstream:
        config = everywhere(keyed(proxy_config(upstream.url)))
        async with run_served(config, credentials) as port, aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            async with session.get(f"{base}/v1/x") as response:
                assert (response.status, (await response.json())["error"]) == (
                    401,
                    "client_key_required",
                )
            async with session.get(f"{base}/v1/x", headers={"X-Proxy-Key": WRONG}) as response:
                assert response.status == 401
            assert upstream.hits == 0
            async with session.get(f"{base}/_proxy/healthz") as response:
                assert response.status == 200
            headers = {"Proxy-Authorization": f"Bearer {KEY}"}
            async with session.get(f"{base}/v1/x", headers=headers) as response:
                assert response.status == 200
            assert upstream.hits == 1


async def test_the_pages_listener_needs_no_key_beyond_loopback(tmp_path: Path) -> None:
    """Browsers reach it and cannot send a key; it serves only the authorise page."""
    async with run_echo_upstream() as upstream:
        pages_port = free_port()
        config = replace(
            proxy_config(upstream.url),
            pages=Pages(host="0.0.0.0", port=pages_port),  # noqa: S104
        )
        async with (
            run_served(config, RecordingCredentials()),
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{pages_port}/v1/x") as response,
        ):
            assert (response.status, (await response.json())["error"]) == (404, "not_found")
        assert upstream.hits == 0


# --- keys limited to connections, against the sandbox (real connections) ---


async def test_keys_limited_to_connections(sandbox: RunningSandbox, tmp_path: Path) -> None:
    acme_port = free_port()
    base = connections_config(sandbox.url, tmp_path, names=[("acme", acme_port), ("beta", None)])
    config = everywhere(keyed(base))
    await give_tokens(config, ["acme", "beta"])
    main = f"http://127.0.0.1:{config.listen.port}"
    acme = {"X-Proxy-Key": ACME_KEY}
    full = {"Proxy-Authorization": f"Bearer {KEY}"}
    async with serving(config), aiohttp.ClientSession() as session:

        async def status_of(url: str, headers: dict[str, str]) -> tuple[int, Any]:
            async with session.get(url, headers=headers) as response:
                return response.status, await response.json(content_type=None)

        before = (await get_stats(sandbox.url))["api_requests"]
        refused = [
            (f"{main}/v1/introspect", {**acme, "X-Pleo-Connection": "beta"}),
            (f"{main}/c/beta/v1/introspect", acme),
            (f"{main}/c/nope/v1/introspect", acme),  # 403, not 404: says nothing of it
            (f"{main}/c/beta/_proxy/status", acme),
            (f"{main}/_proxy/status", acme),  # no `default`: about every connection
            (f"{main}/_proxy/metrics", acme),
            (f"{main}/_proxy/connections", {**acme, **admin_headers()}),
        ]
        for url, headers in refused:
            status, body = await status_of(url, headers)
            assert (status, body["error"]) == (403, "connection_not_allowed"), url
        # The connection's own port asks for a key too.
        status, body = await status_of(f"http://127.0.0.1:{acme_port}/v1/introspect", {})
        assert (status, body["error"]) == (401, "client_key_required")
        assert (await get_stats(sandbox.url))["api_requests"] == before

        allowed = [
            (f"http://127.0.0.1:{acme_port}/v1/introspect", acme),
            (f"{main}/c/acme/v1/introspect", acme),
            (f"{main}/v1/introspect", {**acme, "X-Pleo-Connection": "acme"}),
            (f"{main}/c/acme/_proxy/status", acme),
            (f"http://127.0.0.1:{acme_port}/_proxy/readyz", acme),
            (f"{main}/c/beta/v1/introspect", full),
            (f"{main}/_proxy/status", full),
            (f"{main}/_proxy/connections", {**full, **admin_headers()}),
        ]
        for url, headers in allowed:
            assert (await status_of(url, headers))[0] == 200, url
        assert (await get_stats(sandbox.url))["api_requests"] == before + 4

        # Through the sandbox's echo: neither key header reaches Pleo.
        status, echoed = await status_of(f"{main}/c/acme/v1/echo/x", acme)
        assert status == 200
        assert not {"x-proxy-key", "proxy-authorization"} & {
            k.lower() for k, _ in echoed["headers"]
        }


# --- rotation: SIGHUP to `pleo-proxy run` ---


def _status(port: int, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/_proxy/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _set_keys(path: Path, *keys: str) -> None:
    doc = yaml.safe_load(path.read_text())
    doc["listen"]["client_keys"] = [{"key": key} for key in keys]
    path.write_text(yaml.safe_dump(doc))


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_keys_rotate_on_sighup_without_a_restart(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "proxy.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=port,
        state_dir=tmp_path / "st",
        listen={"host": "0.0.0.0", "client_keys": [{"key": KEY}]},  # noqa: S104
    )
    proc = subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/_proxy/healthz")
        old, new = {"X-Proxy-Key": KEY}, {"X-Proxy-Key": ACME_KEY}
        assert (_status(port, old), _status(port, new)) == (200, 401)

        _set_keys(config, KEY, ACME_KEY)  # both while clients move over
        proc.send_signal(signal.SIGHUP)
        _until(lambda: _status(port, new) == 200)
        assert _status(port, old) == 200

        _set_keys(config, ACME_KEY)
        proc.send_signal(signal.SIGHUP)
        _until(lambda: _status(port, old) == 401)
        assert _status(port, new) == 200

        # Emptying the list beyond loopback would open the proxy: that reload is refused.
        _set_keys(config)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # a reload that went through would now let no-key requests in
        assert (_status(port, {}), _status(port, new)) == (401, 200)
        assert proc.poll() is None
    finally:
        stop(proc)
