"""Assembly of the aiohttp applications: routes, middlewares, long-lived resources.

Owns the route tables (the main listener's reserved `/_proxy/*` paths and catch-all
forwarder; a connection's own port; the pages listener), their one middleware
(proxy.http.front) and the `cleanup_ctx` resources (upstream session, events, the
registry of connections, the authoriser). Must not forward,
refresh or listen itself (proxy.http.serve listens).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from proxy.config import Config
from proxy.connect.routes import authorise_routes, authoriser_ctx
from proxy.http.access_log import AccessLogger, access_logger
from proxy.http.body import defer_continue
from proxy.http.connections_api import connections_api_routes
from proxy.http.fairness import FAIRNESS_KEY, Fairness
from proxy.http.forward import forward
from proxy.http.front import front_middleware
from proxy.http.guard import REFUSALS_KEY
from proxy.http.keys import (
    CLOCK_KEY,
    CONFIG_KEY,
    CREDENTIALS_KEY,
    EVENTS_KEY,
    FIXED_CONNECTION_KEY,
    FRONT_KEY,
    REFRESH_HELPER_KEY,
    REGISTRY_KEY,
    STEADY_KEY,
    TOKENS_KEY,
    UPSTREAM_SESSION_KEY,
)
from proxy.http.limits import server_limits
from proxy.http.probes import connection_probe_routes, probe_routes
from proxy.http.upstream import UPSTREAM_GATE_KEY, UpstreamGate, upstream_session_ctx
from proxy.lifecycle.clocks import steady_clock
from proxy.lifecycle.credentials import ApiKeySource, CredentialSource
from proxy.lifecycle.exchange import Exchanger
from proxy.lifecycle.manager import TokenState
from proxy.lifecycle.registry import Registry, StateHook
from proxy.names import DEFAULT_CONNECTION
from proxy.ops.events import EventSink, EventsSettings
from proxy.ops.metrics import METRICS_KEY, Metrics
from proxy.ops.reload import LIVE_KEY, LiveSettings
from proxy.store import open_stores


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
    """OAuth mode: open the stores, start every connection's manager, close them at the end.

    With `REFRESH_HELPER_KEY` set, token exchanges run in the refresh helper process; it is
    closed last, after the managers (whose refreshes in flight it may still be running).
    """
    config = app[CONFIG_KEY]
    exchanger = Exchanger(config) if app.get(REFRESH_HELPER_KEY, False) else None
    try:
        stores = open_stores(config)
        try:
            registry = Registry(
                config,
                stores,
                app[UPSTREAM_SESSION_KEY],
                clock=app[CLOCK_KEY],
                steady=app[STEADY_KEY],
                counters=app[METRICS_KEY],
                on_state=_on_state(app[EVENTS_KEY]),
                exchanger=exchanger,
            )
            await registry.start()
            if exchanger is not None:
                exchanger.start_soon()  # once the store is known good: no helper for a failed start
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
    finally:
        if exchanger is not None:
            await exchanger.close()


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
    steady: Callable[[], float] = steady_clock,
    refresh_helper: bool = False,
) -> web.Application:
    """The proxy as an aiohttp application; `credentials` overrides the config's mode.

    `clock` is the wall clock, `steady` the one token lifetimes are also judged on
    (proxy/lifecycle/clocks.py); tests pass shifted ones.

    `refresh_helper` runs token exchanges in a helper process that outlives this one
    (proxy/lifecycle/exchange.py); `serve()` sets it.
    """
    live = LiveSettings(config)
    refusals: collections.Counter[str] = collections.Counter()
    metrics = Metrics()
    front = front_middleware(lambda: live.policy, metrics)
    app = web.Application(middlewares=[front])
    app[FRONT_KEY] = front
    app[CONFIG_KEY] = config
    app[LIVE_KEY] = live
    app[CLOCK_KEY] = clock
    app[STEADY_KEY] = steady
    app[REFRESH_HELPER_KEY] = refresh_helper
    app[REFUSALS_KEY] = refusals
    app[METRICS_KEY] = _watch(app, metrics)
    # One table for every listener (listener_app shares it): limits are per connection.
    app[UPSTREAM_GATE_KEY] = UpstreamGate(
        config.upstream.max_connections, config.upstream.queue_timeout
    )
    app[FAIRNESS_KEY] = Fairness(
        config.limits.per_connection, on_refusal=app[METRICS_KEY].rate_limited
    )
    app.cleanup_ctx.append(upstream_session_ctx)
    _install_credentials(app, credentials)
    app.add_routes(_routes(config))
    return app


def listener_app(main: web.Application, *, connection: str | None = None) -> web.Application:
    """An app for another listener (a connection's own port, or the pages listener with
    `connection=None`) that shares the main app's state; build it after the main app's
    setup, once its resources exist."""
    live = main[LIVE_KEY]
    # The pages listener serves browsers only (the authorise page and the callback),
    # which cannot send a client key; its own protections are the setup code and state.
    front = front_middleware(
        lambda: live.policy, main[METRICS_KEY], client_keys=connection is not None
    )
    app = web.Application(middlewares=[front])
    for key in main:
        app[key] = main[key]  # the same objects: one registry, session and metrics
    app[FRONT_KEY] = front
    if connection is not None:
        app[FIXED_CONNECTION_KEY] = connection
        app.add_routes(connection_routes())
    else:
        app.add_routes(pages_routes())
    return app


def _watch(app: web.Application, metrics: Metrics) -> Metrics:
    """`metrics` made to read the app's refusals, connection states and token expiry."""
    metrics.count_refusals(app[REFUSALS_KEY])

    def connection_states() -> collections.Counter[str]:
        registry = app.get(REGISTRY_KEY)
        return registry.state_counts() if registry is not None else collections.Counter()

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
        # A body sent with Content-Encoding goes to Pleo as it came, header and bytes
        # alike: aiohttp would otherwise inflate it and we would relay the header with it.
        "auto_decompress": False,
        # Request-line/header bounds and the idle timeout (`limits:`).
        **server_limits(config),
    }
