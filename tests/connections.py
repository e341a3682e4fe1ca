"""Test support for many connections: configs, a served proxy (all its listeners), grants.

`serving(config)` runs the real `serve()` in this process (main listener, connections'
own ports, the pages listener) until the block ends. `give_tokens()` stores sandbox
tokens for a connection the way `pleo-proxy import-tokens --connection` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.cli_tokens import with_registry
from proxy.config import Admin, Config, Connections, ConnectionSpec, Events, Listen
from proxy.http.serve import serve
from proxy.lifecycle.registry import Registry
from proxy.secret import Secret
from tests.flows import grant_tokens, sandbox_config
from tests.processes import free_port, write_config
from tests.sandboxes import set_knobs

ADMIN_KEY = "admin-key-for-tests-0123456789"
WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"
START_TIMEOUT = 20.0


def connections_config(
    sandbox_url: str,
    state_dir: Path,
    *,
    names: list[tuple[str, int | None]] | None = None,
    admin: bool = True,
    webhook_url: str | None = None,
    return_to_origins: tuple[str, ...] = (),
    link_ttl: float = 24 * 3600.0,
) -> Config:
    """A proxy on free ports for the sandbox; `names` (name, own port) are configured,
    None means only connections made at run time (no implicit default)."""
    port = free_port()
    base = sandbox_config(
        sandbox_url,
        state_dir,
        port=port,
        redirect_uri=f"http://localhost:{port}/_proxy/callback",
    )
    specs = tuple(ConnectionSpec(name, own) for name, own in (names or []))
    return replace(
        base,
        listen=Listen(host="127.0.0.1", port=port),
        connections=Connections(
            configured=specs,
            implicit_default=False,
            link_ttl=link_ttl,
            return_to_origins=return_to_origins,
        ),
        admin=Admin(key=Secret(ADMIN_KEY) if admin else None),
        events=Events(
            webhook_url=webhook_url,
            webhook_secret=Secret(WEBHOOK_SECRET) if webhook_url else None,
        ),
    )


def write_connections_config(path: Path, config: Config) -> Path:
    """`config` (from `connections_config`) as a YAML file the CLI and `run` can read."""
    specs = [
        {"name": s.name, **({"listen": {"port": s.port}} if s.port else {})}
        for s in config.connections.configured
    ]
    overrides: dict[str, Any] = {
        "connections": {
            "configured": specs,
            "link_ttl": config.connections.link_ttl,
            "return_to_origins": list(config.connections.return_to_origins),
        },
        "refresh": {"before_expiry": config.refresh.before_expiry},
        "tokens": {
            "store": config.tokens.store,
            **({"redis_url": config.tokens.redis_url} if config.tokens.redis_url else {}),
        },
    }
    if config.admin.key is not None:
        overrides["admin"] = {"key": config.admin.key.reveal()}
    if config.events.webhook_url and config.events.webhook_secret:
        overrides["events"] = {
            "webhook_url": config.events.webhook_url,
            "webhook_secret": config.events.webhook_secret.reveal(),
        }
    return write_config(
        path,
        sandbox_url=config.pleo.api_url,
        port=config.listen.port,
        state_dir=config.tokens.path.parent,
        **overrides,
    )


def url_of(config: Config) -> str:
    return f"http://127.0.0.1:{config.listen.port}"


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[None]:
    """`serve(config)` in a task, listening when the block starts, stopped after it."""
    stop = asyncio.Event()
    listening = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop, on_listening=lambda _: listening.set()))
    waiter = asyncio.create_task(listening.wait())
    try:
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises why it did not start
        assert waiter in done, "the proxy did not start listening"
        yield
    finally:
        waiter.cancel()
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def distinct_companies(sandbox_url: str, config: Config) -> None:
    """Every grant the sandbox makes is another company; the proxy's callback is allowed."""
    await set_knobs(
        sandbox_url,
        distinct_companies=True,
        auto_approve=True,
        redirect_uris=[config.pleo.redirect_uri],
    )


async def give_tokens(config: Config, names: list[str]) -> None:
    """One sandbox grant per name, stored as `import-tokens --connection NAME` would."""
    grants = [await grant_tokens(config, now=time.time()) for _ in names]

    async def install(registry: Registry) -> int:
        for name, tokens in zip(names, grants, strict=True):
            await registry.install(name, tokens)
        return 0

    await with_registry(config, install)


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: every event whose signature is valid."""

    url: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        given = request.headers.get("X-Pleo-Proxy-Signature", "")
        if not hmac.compare_digest(given, expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.events.append(json.loads(body))
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def wait_until(predicate: Any, *, timeout: float = 10.0, every: float = 0.05) -> None:
    """Poll an async or plain predicate until it is true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def get_json(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with session.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)
