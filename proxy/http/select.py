"""Which connection a request means, and the credential source that serves it.

A request names a connection by the listener it arrived on (a connection's own port),
the `X-Pleo-Connection` header, or the `/c/NAME/` path prefix (removed before
forwarding: `/c/acme/v1/x` reaches Pleo as `/v1/x`). Naming none is fine while a
`default` connection exists (or exactly one). O(1) whatever the number of connections.
Must not forward, refresh, or read the store beyond the registry's own lookup.
"""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web

from proxy.errors import (
    ConnectionMismatch,
    ConnectionRequired,
    InvalidConnectionName,
    UnknownConnection,
)
from proxy.http.client_keys import allow_connection
from proxy.http.keys import CREDENTIALS_KEY, FIXED_CONNECTION_KEY, REGISTRY_KEY
from proxy.lifecycle.credentials import CredentialSource
from proxy.lifecycle.manager import TokenManager
from proxy.names import DEFAULT_CONNECTION, NAME_RULE, is_valid_name

CONNECTION_HEADER = "X-Pleo-Connection"
PREFIX = "/c/"


class Target(NamedTuple):  # a tuple: built per request, ~3x cheaper than a frozen dataclass
    """The connection a request names (None: none) and the raw target Pleo is sent."""

    name: str | None
    raw_path: str


def _checked(name: str, where: str) -> str:
    if not is_valid_name(name):
        raise InvalidConnectionName(f"the connection named by {where} is not valid: {NAME_RULE}")
    return name


def split_prefix(raw_path: str) -> tuple[str | None, str]:
    """(`NAME`, rest) for `/c/NAME/rest`; (None, raw_path) without the prefix."""
    if not raw_path.startswith(PREFIX):
        return None, raw_path
    tail = raw_path[len(PREFIX) :]
    end = min((i for i in (tail.find("/"), tail.find("?")) if i >= 0), default=len(tail))
    name, rest = tail[:end], tail[end:]
    if not rest.startswith("/"):
        rest = "/" + rest
    return _checked(name, "the /c/ path prefix"), rest


def named_target(raw_path: str, headers: list[str], fixed: str | None) -> Target:
    """Who the request names; ConnectionMismatch when the header, prefix and port disagree."""
    by_prefix, rest = split_prefix(raw_path)
    if not headers and by_prefix is None:
        return Target(fixed, rest)  # the common case: at most the listener names one
    named = {_checked(h.strip(), f"the {CONNECTION_HEADER} header") for h in headers}
    if by_prefix is not None:
        named.add(by_prefix)
    if fixed is not None:
        named.add(fixed)
    if len(named) > 1:
        raise ConnectionMismatch(
            "the request names more than one connection (header, /c/ prefix or port)"
        )
    return Target(next(iter(named), None), rest)


def target_of(request: web.Request) -> Target:
    """`named_target` for an aiohttp request."""
    headers = request.headers.getall(CONNECTION_HEADER, [])
    return named_target(request.raw_path, headers, request.app.get(FIXED_CONNECTION_KEY))


def implied_name(names: list[str]) -> str:
    """The connection a request that names none uses: `default`, else the only one."""
    if DEFAULT_CONNECTION in names:
        return DEFAULT_CONNECTION
    if len(names) == 1:
        return names[0]
    raise _required()


def _required() -> ConnectionRequired:
    return ConnectionRequired(
        f"several connections exist and none is named {DEFAULT_CONNECTION!r}: name one"
        f" with the {CONNECTION_HEADER} header or a /c/NAME/ path prefix"
    )


async def manager_for(request: web.Request, name: str | None) -> TokenManager:
    """The token manager of connection `name` (or the implied one); UnknownConnection.

    ConnectionNotAllowed first when the client key may not use it (a key limits which
    connections a request may use; it never chooses one).
    """
    registry = request.app[REGISTRY_KEY]
    if name is None:
        name = registry.implied()  # O(1), whatever the number of connections
        if name is None:
            raise _required()
    allow_connection(request, name)  # before the lookup: a refusal says nothing of it
    manager = registry.get(name) or await registry.find(name)
    if manager is None:
        raise UnknownConnection(f"no connection named {name!r}")
    return manager


def connection_name(credentials: CredentialSource) -> str:
    """The name of the connection `credentials` serves (API-key mode: `default`)."""
    return credentials.name if isinstance(credentials, TokenManager) else DEFAULT_CONNECTION


async def credentials_for(request: web.Request) -> tuple[CredentialSource, str]:
    """The credential source for this request and the raw target to send upstream."""
    target = target_of(request)
    fixed = request.app.get(CREDENTIALS_KEY)
    if fixed is not None:
        # API-key mode (or a test's credential source): one connection, `default`.
        allow_connection(request, target.name or DEFAULT_CONNECTION)
        if target.name not in (None, DEFAULT_CONNECTION):
            raise UnknownConnection(f"no connection named {target.name!r}")
        return fixed, target.raw_path
    return await manager_for(request, target.name), target.raw_path
