"""One log line per request: method, path without the query, status, bytes, duration.

The query is never written: the OAuth callback's carries the authorisation code and
state, and API queries may carry customer data.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %s bytes %.1f ms",
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
            extra={
                "fields": {
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "bytes": response.body_length,
                    "duration_ms": round(time * 1000, 1),
                    "request_id": request.headers.get("X-Request-Id"),
                }
            },
        )


def access_logger() -> logging.Logger:
    return logging.getLogger("proxy.access")
