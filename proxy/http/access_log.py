"""Per-request bookkeeping: the request id, the access log line and the request metrics.

One line per request: method, path without the query, status, bytes, duration, upstream
time and request id. The query is never written: the OAuth callback's carries the
authorisation code and state, and API queries may carry customer data. A client's
`X-Request-Id` is kept only when it is short and plain; otherwise one is generated.
Must not log headers or bodies.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import secrets
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.ops.logs import log_fields, redact
from proxy.ops.metrics import metrics_of

REQUEST_ID_HEADER = "X-Request-Id"
# Sane ids only: they reach our logs and Pleo's; no spaces, quotes or control bytes.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
REQUEST_ID_KEY = web.RequestKey("request_id", str)
UPSTREAM_SECONDS_KEY = web.RequestKey("upstream_seconds", float)
# time.perf_counter() when the front middleware took the request. aiohttp's own duration
# comes from loop.time(), which on uvloop ticks in whole milliseconds.
STARTED_KEY = web.RequestKey("started", float)


# Our ids: a random prefix per process and a counter, unique across processes and hosts
# without a system call per request (uuid4 reads the kernel's random source each time).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id(request: web.Request) -> str:
    """The request's id: the client's when sane, else a new one (32 hex); stable per request."""
    known = request.get(REQUEST_ID_KEY)
    if isinstance(known, str):
        return known
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    chosen = sent if sent and _SANE_REQUEST_ID.fullmatch(sent) else new_request_id()
    request[REQUEST_ID_KEY] = chosen
    return chosen


def add_upstream_time(request: web.Request, seconds: float) -> None:
    """Account time spent waiting for Pleo (a replay adds to the first attempt)."""
    request[UPSTREAM_SECONDS_KEY] = request.get(UPSTREAM_SECONDS_KEY, 0.0) + seconds


def _bytes_in(request: web.BaseRequest) -> int:
    # Bytes of the body actually received (also for chunked and streamed bodies).
    return int(getattr(request.content, "total_bytes", 0))


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls `log` once the response is fully sent: the line and the counters."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        metrics = metrics_of(request)
        if metrics is not None:
            metrics.request_done(
                request.method,
                response.status,
                bytes_in=_bytes_in(request),
                bytes_out=response.body_length,
            )
        if self.logger.isEnabledFor(logging.INFO):
            self._write(request, response, time)

    def _write(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        started = request.get(STARTED_KEY)
        if started is not None:  # else refused before the front middleware (malformed)
            time = perf_counter() - started
        # What the line says, taken now; the line itself is made when it is written.
        line = functools.partial(
            _access_line,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
            request.get(UPSTREAM_SECONDS_KEY),
            request_id(request) if isinstance(request, web.Request) else None,
        )
        log_fields(self.logger, logging.INFO, line)


def _access_line(
    method: str,
    path: str,
    status: int,
    length: int,
    seconds: float,
    upstream: float | None,
    rid: str | None,
) -> tuple[str, dict[str, Any]]:
    # The client's own parts are redacted here, each once; the rest are numbers and
    # fixed words, so the handler's filter need not scan the line again.
    path = redact(path)
    rid = None if rid is None else redact(rid)
    method = redact(method)
    upstream_ms = None if upstream is None else round(upstream * 1000, 1)
    duration_ms = round(seconds * 1000, 1)
    shown_upstream = "-" if upstream_ms is None else upstream_ms
    # Formatted here, no arguments left: every part is redacted or a number.
    message = (
        f"{method} {path} {status} {length} bytes"
        f" {duration_ms:.1f} ms (upstream {shown_upstream} ms) id={rid}"
    )
    return message, {
        "method": method,
        "path": path,
        "status": status,
        "bytes": length,
        "duration_ms": duration_ms,
        "upstream_ms": upstream_ms,
        "request_id": rid,
    }


def access_logger() -> logging.Logger:
    return logging.getLogger("proxy.access")
