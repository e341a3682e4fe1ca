"""The proxy's own read-only endpoints: healthz, readyz, status and metrics.

Never changes token state and never shows a secret.
"""

from __future__ import annotations

from aiohttp import web

from proxy.http.keys import CLOCK_KEY, TOKENS_KEY
from proxy.ops.metrics import METRICS_KEY


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves requests."""
    return web.json_response({"status": "ok"})


def readiness(app: web.Application) -> tuple[bool, str]:
    """Whether a forwarded request would get a usable credential now, and why not."""
    tokens = app.get(TOKENS_KEY)
    if tokens is None:
        return True, "api_key"
    status = tokens.status()
    current = tokens.tokens
    if current is None:
        return False, str(status["state"])
    if not current.is_valid(app[CLOCK_KEY]()):
        return False, "access_token_expired"
    return True, str(status["state"])


async def readyz(request: web.Request) -> web.Response:
    """200 only with a usable token; 503 with the reason otherwise."""
    ready, reason = readiness(request.app)
    body = {"ready": ready, "reason": reason}
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """The status JSON of the contract (state, expiry, scopes, subject, last refresh)."""
    tokens = request.app.get(TOKENS_KEY)
    if tokens is None:
        return web.json_response({"state": "api_key", "mode": "api_key"})
    return web.json_response(tokens.status())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics."""
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def admin_routes() -> list[web.RouteDef]:
    return [
        web.get("/_proxy/healthz", healthz),
        web.get("/_proxy/readyz", readyz),
        web.get("/_proxy/status", status),
        web.get("/_proxy/metrics", metrics),
    ]
