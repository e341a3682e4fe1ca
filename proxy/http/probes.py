"""The proxy's own read-only endpoints: healthz, readyz, status and metrics.

readyz and status describe one connection: the one a request names (header, `/c/NAME/`
prefix, its own port), else `default`. Without a `default` they describe the process
(readiness does not hang on one customer) and count connections by state; names are
listed only by the admin API. Never changes token state and never shows a secret.
"""

from __future__ import annotations

from aiohttp import web

from proxy.http.client_keys import allow_connection
from proxy.http.keys import CLOCK_KEY, REGISTRY_KEY
from proxy.http.select import manager_for, target_of
from proxy.lifecycle.manager import TokenManager
from proxy.names import DEFAULT_CONNECTION
from proxy.ops.metrics import METRICS_KEY


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves requests."""
    return web.json_response({"status": "ok"})


def readiness(app: web.Application, manager: TokenManager | None) -> tuple[bool, str]:
    """Whether a forwarded request would get a usable credential now, and why not."""
    if REGISTRY_KEY not in app:
        return True, "api_key"
    if manager is None:
        return True, "connections"
    current = manager.tokens
    if current is None:
        return False, manager.state.value
    if not current.is_valid(app[CLOCK_KEY]()):
        return False, "access_token_expired"
    return True, manager.state.value


async def _described(request: web.Request) -> TokenManager | None:
    """The connection the request names, else `default`, else None (the whole process).

    A client key limited to some connections may describe only those.
    """
    if REGISTRY_KEY not in request.app:
        allow_connection(request, DEFAULT_CONNECTION)  # API-key mode: `default` only
        return None
    name = target_of(request).name  # validated: the raw /c/NAME/ prefix, header or port
    if name is None:
        registry = request.app[REGISTRY_KEY]
        manager = registry.get(DEFAULT_CONNECTION)
        allow_connection(request, None if manager is None else DEFAULT_CONNECTION)
        return manager
    return await manager_for(request, name)


async def readyz(request: web.Request) -> web.Response:
    """200 only with a usable token; 503 with the reason otherwise."""
    ready, reason = readiness(request.app, await _described(request))
    body = {"ready": ready, "reason": reason}
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """The status JSON of the contract (state, expiry, scopes, subject, last refresh)."""
    manager = await _described(request)
    if REGISTRY_KEY not in request.app:
        return web.json_response({"state": "api_key", "mode": "api_key"})
    if manager is not None:
        return web.json_response(manager.status())
    registry = request.app[REGISTRY_KEY]
    by_state = registry.state_counts()
    return web.json_response({"connections": {"count": len(registry), "by_state": by_state}})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics."""
    allow_connection(request, None)  # about every connection
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def probe_routes() -> list[web.RouteDef]:
    return [
        web.get("/_proxy/healthz", healthz),
        web.get("/_proxy/readyz", readyz),
        web.get("/_proxy/status", status),
        web.get("/_proxy/metrics", metrics),
    ]


def connection_probe_routes() -> list[web.RouteDef]:
    """readyz and status of one connection, behind its `/c/NAME/` prefix."""
    return [
        web.get("/c/{name}/_proxy/readyz", readyz),
        web.get("/c/{name}/_proxy/status", status),
    ]
