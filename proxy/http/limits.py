"""What a client connection may send: `limits.*` config → aiohttp server keyword arguments.

Owns the mapping from our `Limits` to the options aiohttp's HTTP parser and keep-alive
timer enforce (`web.AppRunner(app, **server_limits(config))`). Must not open sockets,
build the app or enforce anything itself: aiohttp does the enforcing.
"""

from __future__ import annotations

from typing import Any

from proxy.config import Config


def server_limits(config: Config) -> dict[str, Any]:
    """Keyword arguments for `web.AppRunner`/`web.Server` (and so aiohttp's RequestHandler)."""
    limits = config.limits
    return {
        # Longer request line → 400 "Got more than N bytes"; the connection is closed.
        "max_line_size": limits.max_request_line,
        # One header field (name + value) longer than this → 400; aiohttp counts both.
        "max_field_size": limits.max_header_size,
        # More header fields than this → 400 "Too many headers received".
        "max_headers": limits.max_headers,
        # aiohttp has no separate header-read timeout. Its keep-alive timer starts when
        # a connection opens and after each answer, and closes the connection if no
        # complete request head has arrived when it fires: trickled bytes do not reset
        # it, so this one value bounds both idle connections and slowloris heads.
        "keepalive_timeout": limits.idle_timeout,
    }
