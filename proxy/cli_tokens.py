"""The `pleo-proxy` subcommands that act on connections: status, token, import-tokens,
logout, connect and authorize-url, each with `--connection NAME`.

They open the configured store with a registry that runs no background task, do one
thing and close it; a running proxy sees the change within a second (the store's change
marker). Output for people on stdout, errors on stderr; no secret is printed except by
`token` (the access token) and `connect` (the one-time link, which is its purpose).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.config import Config
from proxy.errors import ProxyError
from proxy.lifecycle import oauth
from proxy.lifecycle.registry import Registry
from proxy.lifecycle.rules import iso_utc
from proxy.names import DEFAULT_CONNECTION, NAME_RULE, is_valid_name
from proxy.store import open_stores
from proxy.tokenset import TokenSet
from proxy.urls import url_with_code

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


async def with_registry(config: Config, action: Callable[[Registry], Awaitable[int]]) -> int:
    """Run `action(registry)` on the configured store, without background tasks."""
    stores = open_stores(config)
    try:
        async with aiohttp.ClientSession() as session:
            registry = Registry(config, stores, session)
            await registry.start(background=False)
            try:
                return await action(registry)
            finally:
                await registry.close()
    finally:
        await stores.close()


def usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def bad_name(name: str | None) -> bool:
    return name is not None and not is_valid_name(name)


def _single_default(config: Config, registry: Registry) -> bool:
    """True when the proxy has only its implicit `default`: output exactly as it always was."""
    return config.connections.implicit_default and registry.names() == [DEFAULT_CONNECTION]


async def read_status(config: Config, connection: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {}

    async def read(registry: Registry) -> int:
        if connection is not None or _single_default(config, registry):
            result.update((await registry.require(connection or DEFAULT_CONNECTION)).status())
            return EXIT_OK
        listed = []
        for name in registry.names():
            manager = await registry.require(name)
            listed.append(
                {"name": name, **manager.status(), "configured": name in registry.configured}
            )
        result["connections"] = listed
        return EXIT_OK

    await with_registry(config, read)
    return result


async def status(config: Config, connection: str | None) -> int:
    print(json.dumps(await read_status(config, connection), indent=2))
    return EXIT_OK


async def token(config: Config, connection: str | None) -> int:
    async def show(registry: Registry) -> int:
        manager = await registry.require(connection or DEFAULT_CONNECTION)
        print((await manager.current_token()).access_token.reveal())
        return EXIT_OK

    return await with_registry(config, show)


async def logout(config: Config, connection: str | None) -> int:
    async def forget(registry: Registry) -> int:
        await registry.logout(connection or DEFAULT_CONNECTION)
        print(
            "local tokens deleted. Pleo documents no revocation endpoint: to revoke the"
            " grant itself, disconnect the app in Pleo's settings."
        )
        return EXIT_OK

    return await with_registry(config, forget)


async def connect(config: Config, connection: str, return_to: str | None) -> int:
    """Create the connection if it is new and print its one-time authorise URL."""

    async def issue(registry: Registry) -> int:
        issued = await registry.issue_link(connection, return_to=return_to)
        print(url_with_code(config, connection, issued.code))
        made = "created; " if issued.created else ""
        print(f"{made}the link works once, until {iso_utc(issued.expires_at)}", file=sys.stderr)
        return EXIT_OK

    return await with_registry(config, issue)


@dataclass(frozen=True)
class Grant:
    """One line of an import: whose tokens, and the tokens."""

    connection: str
    tokens: TokenSet


def parse_import(text: str, config: Config, connection: str | None) -> list[Grant] | list[str]:
    """The grants on stdin, or the problems (`line N: ...`); nothing is half imported."""
    now = time.time()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "connection" not in whole:
        # The single-object form, as it always was.
        docs: list[tuple[int, object]] = [(1, whole)]
    else:
        docs = [(n, _line(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not docs:
        return ["stdin holds no JSON object"]
    grants: list[Grant] = []
    problems: list[str] = []
    for number, doc in docs:
        try:
            grants.append(_grant(doc, config, connection, now))
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    return problems or grants


def _line(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return ValueError(f"not JSON (column {exc.colno})")


def _grant(doc: object, config: Config, connection: str | None, now: float) -> Grant:
    if isinstance(doc, ValueError):
        raise doc
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    fields = dict(doc)
    name = fields.pop("connection", None)
    if connection is not None and name is not None and name != connection:
        raise ValueError(f"names connection {name!r}, but --connection is {connection!r}")
    name = name if name is not None else connection or DEFAULT_CONNECTION
    if not isinstance(name, str) or not is_valid_name(name):
        raise ValueError(f"invalid connection name: {NAME_RULE}")
    try:
        tokens = oauth.parse_token_response(fields, now=now, requested_scopes=config.pleo.scopes)
    except ProxyError as exc:
        raise ValueError(exc.detail) from None
    return Grant(name, tokens)


async def import_tokens(config: Config, connection: str | None) -> int:
    parsed = parse_import(sys.stdin.read(), config, connection)
    if parsed and isinstance(parsed[0], str):
        for problem in parsed:
            print(f"error: {problem}", file=sys.stderr)
        print("error: nothing was imported", file=sys.stderr)
        return EXIT_USAGE
    grants = [g for g in parsed if isinstance(g, Grant)]
    seen = [g.connection for g in grants]
    if len(set(seen)) != len(seen):
        return usage_error("the same connection appears twice; nothing was imported")

    async def install(registry: Registry) -> int:
        for index, grant in enumerate(grants, 1):
            await registry.install(grant.connection, grant.tokens, notify=index == len(grants))
        if len(grants) == 1 and grants[0].connection == DEFAULT_CONNECTION:
            print("tokens imported; the proxy is authorised")
        else:
            print(f"tokens imported for {len(grants)} connection(s)")
        return EXIT_OK

    return await with_registry(config, install)
