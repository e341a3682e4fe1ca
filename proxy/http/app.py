"""Assembly of the aiohttp application: routes, middlewares, long-lived resources, serving.

Owns the route table (reserved `/_proxy/*` paths, then the catch-all forwarder), the
middleware order (in-flight gauge → guard → JSON errors), the `cleanup_ctx` resources
(upstream `ClientSession`, credential source), and `serve()`: listening, sd_notify,
SIGHUP reload and a graceful shutdown. Must not forward or refresh itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.connect.authorise import authorise_routes, authoriser_ctx
from proxy.errors import ProxyError
from proxy.http.access_log import AccessLogger, access_logger, send_request_id
from proxy.http.connections_api import connections_api_routes
from proxy.http.forward import defer_continue, forward
from proxy.http.guard import REFUSALS_KEY, guard_middleware
from proxy.http.keys import (
    CLOCK_KEY,
    CONFIG_KEY,
    CREDENTIALS_KEY,
    EVENTS_KEY,
    FIXED_CONNECTION_KEY,
    REGISTRY_KEY,
    TOKENS_KEY,
    UPSTREAM_SESSION_KEY,
)
from proxy.http.limits import server_limits
from proxy.http.probes import connection_probe_routes, probe_routes
from proxy.lifecycle.credentials import ApiKeySource, CredentialSource
from proxy.lifecycle.manager import TokenState
from proxy.lifecycle.registry import Registry, StateHook
from proxy.names import DEFAULT_CONNECTION
from proxy.ops import sdnotify
from proxy.ops.events import EventSink, EventsSettings
from proxy.ops.metrics import METRICS_KEY, Metrics, in_flight_middleware
from proxy.ops.reload import LIVE_KEY, LiveSettings, reload
from proxy.store import open_stores

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Upstream pool: enough for bursts of concurrent API calls, small enough to be polite.
UPSTREAM_CONNECTION_LIMIT = 100
UPSTREAM_KEEPALIVE_SECONDS = 30.0
# Pending connections the kernel queues for us (aiohttp's TCPSite default).
LISTEN_BACKLOG = 128
# The client adds none of its own: the upstream sees what our client sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")


async def reserved_not_found(request: web.Request) -> web.Response:
    """Unknown `/_proxy/...` path: ours, so never forwarded."""
    return web.json_response(
        {"error": "not_found", "detail": "no such proxy endpoint"},
        status=404,
    )


def reserved_routes(config: Config) -> list[web.RouteDef]:
    """The proxy's own endpoints under `/_proxy/`. Adding one is adding a line here."""
    routes = list(probe_routes())
    if not config.pleo.uses_api_key:
        if not config.pages.separate:
            routes += authorise_routes()
        if config.admin.key is not None:
            routes += connections_api_routes()
    return routes


def _routes(config: Config) -> list[web.RouteDef]:
    # Order matters: reserved paths (also behind a /c/NAME/ prefix, never forwarded),
    # then the reserved fallback, then the forwarder.
    return [
        *reserved_routes(config),
        *connection_probe_routes(),
        web.route("*", "/_proxy/{tail:.*}", reserved_not_found),
        web.route("*", "/c/{name}/_proxy/{tail:.*}", reserved_not_found),
        web.route("*", "/{tail:.*}", forward, expect_handler=defer_continue),
    ]


def connection_routes() -> list[web.RouteDef]:
    """A connection's own listener: its probes and the forwarder, nothing else."""
    return [
        *probe_routes(),
        web.route("*", "/_proxy/{tail:.*}", reserved_not_found),
        web.route("*", "/c/{name}/_proxy/{tail:.*}", reserved_not_found),
        web.route("*", "/{tail:.*}", forward, expect_handler=defer_continue),
    ]


def pages_routes() -> list[web.RouteDef]:
    """The pages listener: the authorise page and the callback only (never forwarding)."""
    return [*authorise_routes(), web.route("*", "/{tail:.*}", reserved_not_found)]


def _error_slug(reason: str) -> str:
    return reason.strip().lower().replace(" ", "_").replace("-", "_")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ProxyError → its status and body; HTTPException → JSON; anything else → 500."""
    try:
        return await handler(request)
    except ProxyError as err:
        return web.json_response(err.body(), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        body = {"error": _error_slug(exc.reason), "detail": exc.reason}
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(body, status=exc.status, headers=headers)
    except Exception:
        # The exception text may name internals; the client learns only that it failed.
        log.exception("unhandled error while handling %s %s", request.method, request.path)
        return web.json_response(
            {"error": "internal_error", "detail": "internal error"}, status=500
        )


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
        limit=UPSTREAM_CONNECTION_LIMIT,
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


async def _upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
    async with upstream_session(app[CONFIG_KEY]) as session:
        app[UPSTREAM_SESSION_KEY] = session
        yield


def events_settings(config: Config) -> EventsSettings:
    return EventsSettings(
        webhook_url=config.events.webhook_url, webhook_secret=config.events.webhook_secret
    )


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    sink = EventSink(events_settings(app[CONFIG_KEY]), clock=app[CLOCK_KEY])
    await sink.start()
    app[EVENTS_KEY] = sink
    try:
        yield
    finally:
        await sink.close()


def _on_state(sink: EventSink) -> StateHook:
    def on_state(name: str, previous: TokenState, state: TokenState, reason: str | None) -> None:
        sink.state_changed(name, state.value, previous.value, reason)

    return on_state


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    """OAuth mode: open the stores, start every connection's manager, close them at the end."""
    config = app[CONFIG_KEY]
    stores = open_stores(config)
    try:
        registry = Registry(
            config,
            stores,
            app[UPSTREAM_SESSION_KEY],
            clock=app[CLOCK_KEY],
            counters=app[METRICS_KEY],
            on_state=_on_state(app[EVENTS_KEY]),
        )
        await registry.start()
        app[REGISTRY_KEY] = registry
        default = registry.get(DEFAULT_CONNECTION)
        if default is not None:
            app[TOKENS_KEY] = default
        try:
            yield
        finally:
            await registry.close()
    finally:
        await stores.close()


def _install_credentials(app: web.Application, credentials: CredentialSource | None) -> None:
    config = app[CONFIG_KEY]
    if credentials is not None:
        app[CREDENTIALS_KEY] = credentials
    elif config.pleo.api_key is not None:
        app[CREDENTIALS_KEY] = ApiKeySource(config.pleo.api_key)
    else:
        # Needs the upstream session, so it runs after _upstream_session_ctx; the
        # authoriser watches a started registry (no setup URL made for nothing).
        app.cleanup_ctx.append(_events_ctx)
        app.cleanup_ctx.append(_registry_ctx)
        app.cleanup_ctx.append(authoriser_ctx)


def build_app(
    config: Config,
    *,
    credentials: CredentialSource | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The proxy as an aiohttp application; `credentials` overrides the config's mode."""
    live = LiveSettings(config)
    # Guard first: a refused request must not reach anything, error handling included
    # (the in-flight gauge only counts, so it may wrap the guard).
    app = web.Application(
        middlewares=[in_flight_middleware, guard_middleware(lambda: live.policy), json_errors]
    )
    app[CONFIG_KEY] = config
    app[LIVE_KEY] = live
    app[CLOCK_KEY] = clock
    app[REFUSALS_KEY] = collections.Counter()
    app[METRICS_KEY] = _metrics(app)
    app.on_response_prepare.append(send_request_id)
    app.cleanup_ctx.append(_upstream_session_ctx)
    _install_credentials(app, credentials)
    app.add_routes(_routes(config))
    return app


def listener_app(main: web.Application, *, connection: str | None = None) -> web.Application:
    """An app for another listener (a connection's own port, or the pages listener with
    `connection=None`) that shares the main app's state; build it after the main app's
    setup, once its resources exist."""
    live = main[LIVE_KEY]
    app = web.Application(
        middlewares=[in_flight_middleware, guard_middleware(lambda: live.policy), json_errors]
    )
    for key in main:
        app[key] = main[key]  # the same objects: one registry, session and metrics
    app.on_response_prepare.append(send_request_id)
    if connection is not None:
        app[FIXED_CONNECTION_KEY] = connection
        app.add_routes(connection_routes())
    else:
        app.add_routes(pages_routes())
    return app


def _metrics(app: web.Application) -> Metrics:
    metrics = Metrics()
    metrics.count_refusals(app[REFUSALS_KEY])

    def connection_states() -> collections.Counter[str]:
        registry = app.get(REGISTRY_KEY)
        managers = registry.managers() if registry is not None else []
        return collections.Counter(manager.state.value for manager in managers)

    def webhook_outcomes() -> dict[str, float]:
        sink = app.get(EVENTS_KEY)
        if sink is None:
            return {}
        return {"delivered": sink.delivered, "failed": sink.failed, "dropped": sink.dropped}

    metrics.watch_connections(connection_states, webhook_outcomes)

    def seconds_left() -> float | None:
        manager = app.get(TOKENS_KEY)
        tokens = manager.tokens if manager is not None else None
        return None if tokens is None else tokens.expires_at - app[CLOCK_KEY]()

    metrics.watch_expiry(seconds_left)
    return metrics


def runner_options(config: Config) -> dict[str, Any]:
    """AppRunner settings of a served proxy (tests serving `build_app` use them too)."""
    return {
        # A client that goes away cancels its handler, and so its upstream request.
        "handler_cancellation": True,
        "shutdown_timeout": config.timeouts.shutdown,
        # Our own access log: it never writes the query (the callback's holds the code);
        # it also feeds the request metrics, so it is on whatever the log level.
        "access_log_class": AccessLogger,
        "access_log": access_logger(),
        # Request-line/header bounds and the idle timeout (`limits:`).
        **server_limits(config),
    }


def _bound_addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    return [(str(addr[0]), int(addr[1])) for addr in runner.addresses]


class ListenError(ProxyError):
    """The configured address cannot be listened on (taken, not ours, no permission)."""


def apply_reload(app: web.Application, runner: web.AppRunner, config_path: Path) -> None:
    """SIGHUP: re-read `config_path`; apply what may change live, say what needs a restart."""
    sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        applied = reload(app[LIVE_KEY], config_path)
        if applied is not None:
            registry = app.get(REGISTRY_KEY)
            if registry is not None:
                registry.use_config(applied)
            # Read by runner.cleanup() at shutdown; aiohttp itself sets it this way.
            runner._shutdown_timeout = applied.timeouts.shutdown
    finally:
        sdnotify.notify("READY=1")


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, on_hup: Callable[[], None]) -> collections.abc.Iterator[None]:
    """SIGTERM/SIGINT set `stop`, SIGHUP reloads (main thread only: asyncio's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in signums[:2]:
        loop.add_signal_handler(signum, stop.set)
    # systemd's ExecReload sends SIGHUP; without a handler it would end the process.
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


def _reloader(
    app: web.Application, runner: web.AppRunner, config_path: Path | None
) -> Callable[[], None]:
    def on_hup() -> None:
        if config_path is None:
            log.warning("SIGHUP: no configuration file to reload; restart to apply changes")
            return
        apply_reload(app, runner, config_path)

    return on_hup


def _bind(family: int, address: Any, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Workers share the port; the kernel spreads new connections between them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_sockets(config: Config, *, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets systemd passed (socket activation), else the configured address, bound now.

    Bound before anything else starts, so a taken port is reported before the store is
    opened or a setup URL is made.
    """
    passed = sdnotify.listen_fds()
    if passed:
        return passed
    return bind_address(config.listen.host, config.listen.port, reuse_port=reuse_port)


def bind_address(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Sockets for every address `host` resolves to; ListenError naming what failed."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, _, _, _, address in dict.fromkeys(infos):
            sockets.append(_bind(family, address, reuse_port=reuse_port))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason.lower()}") from None
    return sockets


async def _serve_until(
    stop: asyncio.Event, on_hup: Callable[[], None], announce: Callable[[], None]
) -> None:
    """Announce readiness, then wait for `stop`; signal handlers are in place before."""
    interval = sdnotify.watchdog_interval()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(interval)) if interval else None
    try:
        # Handlers first: a SIGHUP right after READY=1 must reload, not end the process.
        with _signals_set(stop, on_hup):
            announce()
            sdnotify.notify("READY=1")
            await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def serve(
    config: Config,
    *,
    credentials: CredentialSource | None = None,
    on_listening: Callable[[list[tuple[str, int]]], None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: Path | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT, then shut down gracefully.

    Shutdown stops accepting, lets in-flight requests finish for up to
    `timeouts.shutdown` seconds, cancels the rest, then closes the upstream session.
    SIGHUP re-reads `config_path` (see `proxy.ops.reload`). `reuse_port` lets several
    worker processes listen on one port (SO_REUSEPORT).
    """
    stop = stop if stop is not None else asyncio.Event()
    sockets = listen_sockets(config, reuse_port=reuse_port)
    try:
        others = other_listeners(config, reuse_port=reuse_port)
    except BaseException:
        _close_all(sockets)
        raise
    app = build_app(config, credentials=credentials)
    runner = web.AppRunner(app, **runner_options(config))
    side_runners: list[web.AppRunner] = []
    try:
        # setup() runs the cleanup contexts: the store is open and verified after it.
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        for connection, socks in others:
            side = web.AppRunner(listener_app(app, connection=connection), **runner_options(config))
            side_runners.append(side)
            await side.setup()
            for sock in socks:
                await web.SockSite(side, sock).start()

        def announce() -> None:
            if on_listening is not None:
                on_listening(_bound_addresses(runner))

        await _serve_until(stop, _reloader(app, runner, config_path), announce)
    finally:
        for side in side_runners:
            await side.cleanup()
        await runner.cleanup()
        _close_all(sockets)
        for _, socks in others:
            _close_all(socks)


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def other_listeners(
    config: Config, *, reuse_port: bool
) -> list[tuple[str | None, list[socket.socket]]]:
    """Sockets of each connection's own port, and of the pages listener (name None)."""
    bound: list[tuple[str | None, list[socket.socket]]] = []
    try:
        for spec in config.connections.configured:
            if spec.port is not None:
                socks = bind_address(config.listen.host, spec.port, reuse_port=reuse_port)
                bound.append((spec.name, socks))
        pages = config.pages
        if pages.port is not None:
            host = pages.host or config.listen.host
            bound.append((None, bind_address(host, pages.port, reuse_port=reuse_port)))
    except BaseException:
        for _, socks in bound:
            _close_all(socks)
        raise
    return bound
