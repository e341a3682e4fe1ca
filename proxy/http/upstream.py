"""The upstream side: the one `ClientSession`, the forwarder's sender, and the gate.

The session (token calls, webhooks, and forwarding through an environment proxy) sends
raw bytes both ways, no cookies, no headers of its own. Forwarding without an
environment proxy uses the lean pool (proxy.http.pool); both are a `Sender`. Owns the
bound on connections in use (`UpstreamGate`), the trust store (plus `pleo.ca_file`) and
the environment proxy for the API host, read once. Must not retry, decompress, or read
`~/.netrc`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Config
from proxy.errors import UpstreamBusy
from proxy.http.body import Body
from proxy.http.keys import CONFIG_KEY, UPSTREAM_SESSION_KEY
from proxy.http.pool import UPSTREAM_KEEPALIVE_SECONDS, UpstreamPool

# The client adds none of its own: the upstream sees what our client sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")


def upstream_ssl_context(config: Config) -> ssl.SSLContext:
    """The system trust store, plus `pleo.ca_file` (a corporate TLS-inspecting CA) if set."""
    context = ssl.create_default_context()
    if config.pleo.ca_file is not None:
        context.load_verify_locations(cafile=str(config.pleo.ca_file))
    return context


def environment_proxy(api_url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy HTTPS_PROXY/HTTP_PROXY name for `api_url`, unless NO_PROXY excludes it."""
    try:
        return aiohttp.helpers.get_env_proxy_for_url(URL(api_url))
    except LookupError:
        return None, None


def upstream_session(config: Config) -> aiohttp.ClientSession:
    """The one upstream session: raw bytes, no cookies, no headers of its own."""
    env_proxy, env_proxy_auth = environment_proxy(config.pleo.api_url)
    connector = aiohttp.TCPConnector(
        # The gate below bounds connections; aiohttp's own queue would wait without bound.
        limit=config.upstream.max_connections,
        keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS,
        ssl=upstream_ssl_context(config),
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        # HTTPS_PROXY / NO_PROXY are read once here, not per request: trust_env would
        # also consult ~/.netrc on every request, and a netrc entry for the API host
        # collides with the Authorization header we set (every request would fail).
        trust_env=False,
        proxy=env_proxy,
        proxy_auth=env_proxy_auth,
        # Set-Cookie must reach the client, never be replayed by us on others' requests.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeouts.connect, sock_read=config.timeouts.read
        ),
    )


class Reply(Protocol):
    """An answer as the forwarder reads it: aiohttp's ClientResponse or the pool's Answer."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...
    @property
    def content(self) -> aiohttp.StreamReader: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


class Sender(Protocol):
    """One exchange with Pleo: send the request, return once the answer's head is in."""

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Body,
        timeouts: aiohttp.ClientTimeout,
    ) -> Reply: ...


class SessionSender:
    """Through the environment proxy (HTTPS_PROXY/HTTP_PROXY), which aiohttp's full
    client tunnels; without one, forwarding uses the lean pool (proxy.http.pool)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Body,
        timeouts: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        return await self._session.request(
            method,
            url,
            headers=headers,
            data=body.payload(),
            allow_redirects=False,
            timeout=timeouts,
        )


async def upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The session (token calls, webhooks, the proxied path) and the forwarder's sender."""
    config = app[CONFIG_KEY]
    async with upstream_session(config) as session:
        app[UPSTREAM_SESSION_KEY] = session
        if environment_proxy(config.pleo.api_url)[0] is not None:
            app[UPSTREAM_SENDER_KEY] = SessionSender(session)
            yield
            return
        pool = UpstreamPool(config.pleo.api_url, upstream_ssl_context(config))
        app[UPSTREAM_SENDER_KEY] = pool
        try:
            yield
        finally:
            await pool.close()


class UpstreamGate:
    """At most `upstream.max_connections` requests use an upstream connection at once; a
    request that waits longer than `upstream.queue_timeout` for one gets 503 upstream_busy
    (a slow Pleo must not make requests queue inside the proxy without bound).

    A counter and a queue of waiters rather than asyncio.Semaphore: a request that finds
    a connection free takes it with no await, no timer and no scan of the waiters
    (Semaphore.locked() walks them on every acquire, a measurable share of a small GET).
    """

    def __init__(self, max_connections: int, queue_timeout: float) -> None:
        self._limit = max_connections  # 0: unbounded
        self._queue_timeout = queue_timeout
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    async def __aenter__(self) -> None:
        if not self._limit or (self._in_use < self._limit and not self._waiters):
            self._in_use += 1
            return
        await self._wait()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        # The slot passes straight to the next waiter, so the count never dips below
        # what is in use and a newcomer cannot jump the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await waiter
        except TimeoutError:
            self._drop(waiter)
            raise UpstreamBusy(
                "every connection to the Pleo API is in use; try again shortly"
            ) from None
        except BaseException:
            self._drop(waiter)
            raise

    def _drop(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release()  # handed a slot in the same moment it gave up: pass it on
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


UPSTREAM_GATE_KEY = web.AppKey("upstream_gate", UpstreamGate)
UPSTREAM_SENDER_KEY = web.AppKey("upstream_sender", Sender)
