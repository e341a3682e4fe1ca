"""The bundled fake Pleo: assembles the sandbox app and runs it on a loopback port.

Used by `pleo-proxy demo`, `pleo-proxy sandbox` and the tests. Must not be imported by
the proxy's request path (app, forward, tokens), and imports nothing of it either.
"""

from __future__ import annotations

import asyncio
import ipaddress

from aiohttp import web

from proxy.sandbox.api import add_api_routes
from proxy.sandbox.control import add_control_routes
from proxy.sandbox.oauth_server import add_oauth_routes
from proxy.sandbox.state import STATE_KEY, SandboxSettings, SandboxState

__all__ = [
    "STATE_KEY",
    "RunningSandbox",
    "SandboxSettings",
    "SandboxState",
    "build_sandbox_app",
    "serve_sandbox_forever",
    "start_sandbox",
]

# Bounded wait for in-flight handlers at close (e.g. a download nobody reads any more).
SHUTDOWN_TIMEOUT = 2.0
DEFAULT_SETTINGS = SandboxSettings()


def build_sandbox_app(settings: SandboxSettings = DEFAULT_SETTINGS) -> web.Application:
    app = web.Application()
    state = SandboxState(settings)
    app[STATE_KEY] = state
    add_oauth_routes(app)
    add_api_routes(app)
    add_control_routes(app)

    async def wake_sleepers(_: web.Application) -> None:
        state.closing.set()

    app.on_shutdown.append(wake_sleepers)
    return app


class RunningSandbox:
    """A sandbox serving on a real socket; `url` has no trailing slash."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self._runner = runner
        self.url = url
        self.app = runner.app

    @property
    def state(self) -> SandboxState:
        return self.app[STATE_KEY]

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_sandbox(
    settings: SandboxSettings = DEFAULT_SETTINGS, *, host: str = "127.0.0.1", port: int = 0
) -> RunningSandbox:
    """Start on host:port (port 0: an ephemeral one) and return once it accepts."""
    runner = web.AppRunner(build_sandbox_app(settings), shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return RunningSandbox(runner, f"http://{_url_host(host)}:{bound_port}")


def _url_host(host: str) -> str:
    """A host for URLs: wildcard binds become loopback, IPv6 literals get brackets."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - only turning a wildcard into loopback
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{host}]" if address.version == 6 else host


async def serve_sandbox_forever(settings: SandboxSettings, *, host: str, port: int) -> None:
    """Run until cancelled (Ctrl-C); prints one line with the URL."""
    sandbox = await start_sandbox(settings, host=host, port=port)
    try:
        print(f"Pleo sandbox listening on {sandbox.url}", flush=True)
        await asyncio.Event().wait()
    finally:
        await sandbox.close()
