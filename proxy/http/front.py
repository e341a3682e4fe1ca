"""The one layer every request passes before its handler: in flight, guarded, errors as JSON.

Owns the order (the in-flight gauge counts everything; the guard refuses before anything
else runs, error handling included; then the handler, whose ProxyError, HTTPException or
unexpected exception becomes a JSON answer), the mapping of those exceptions, and the
request id on every answer (set here rather than in an `on_response_prepare` signal,
which costs a signal dispatch per request). One
middleware rather than three: each aiohttp middleware layer costs a coroutine and a
wrapper per request, a measurable share of a small GET. Must not forward or know tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from time import perf_counter

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.errors import ProxyError
from proxy.http.access_log import REQUEST_ID_HEADER, STARTED_KEY, request_id
from proxy.http.guard import Policy, refuse
from proxy.ops.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def front_middleware(
    policy: Callable[[], Policy], metrics: Metrics, *, client_keys: bool = True
) -> Middleware:
    """The middleware; `policy()` gives the current guard policy (a reload swaps it)."""
    traffic = metrics.traffic

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[STARTED_KEY] = perf_counter()
        traffic.in_flight += 1
        try:
            response = await _answer(request, handler)
        finally:
            traffic.in_flight -= 1
        if not response.prepared:  # the forwarder sends its answers itself, id included
            response.headers[REQUEST_ID_HEADER] = request_id(request)
        return response

    async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = refuse(request, policy(), client_keys=client_keys)
        if refusal is not None:
            return refusal
        try:
            return await handler(request)
        except ProxyError as err:
            return proxy_error_response(request, err)
        except web.HTTPException as exc:
            if exc.status < 400:
                # Redirects and the like are answers, not errors; aiohttp sends them.
                exc.headers[REQUEST_ID_HEADER] = request_id(request)
                raise
            return http_exception_response(exc)
        except Exception:
            # The exception text may name internals; the client learns only that it failed.
            log.exception("unhandled error while handling %s %s", request.method, request.path)
            return web.json_response(
                {"error": "internal_error", "detail": "internal error"}, status=500
            )

    return front


def proxy_error_response(request: web.Request, err: ProxyError) -> web.Response:
    response = web.json_response(err.body(), status=err.status, headers=err.headers())
    if request.body_exists and not request.content.at_eof():
        # Refused before the body was read (no such connection, not allowed): close
        # rather than let aiohttp read and drop the rest of it.
        response.force_close()
    return response


def http_exception_response(exc: web.HTTPException) -> web.Response:
    body = {"error": _error_slug(exc.reason), "detail": exc.reason}
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return web.json_response(body, status=exc.status, headers=headers)


def _error_slug(reason: str) -> str:
    return reason.strip().lower().replace(" ", "_").replace("-", "_")
