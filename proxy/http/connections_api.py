"""The admin API: list, create (with a connect link), show and delete connections.

`/_proxy/connections[/NAME]`, served only when `admin.key` (or `admin.key_file`) is set;
every call needs `Authorization: Bearer <admin key>`, compared in constant time, else 401.
A connect link's URL is answered once, to the caller that asked for it; nothing else in
an answer is a secret. Must not refresh tokens or speak OAuth.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from proxy.config import Config
from proxy.config.values import is_loopback_host
from proxy.connect.routes import AUTHORISER_KEY
from proxy.http.client_keys import allow_connection
from proxy.http.keys import CONFIG_KEY, REGISTRY_KEY
from proxy.lifecycle.manager import TokenManager, TokenState
from proxy.lifecycle.rules import iso_utc
from proxy.names import NAME_RULE, is_valid_name

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COLLECTION = "/_proxy/connections"
CONNECTED = frozenset({TokenState.AUTHORISED, TokenState.REFRESHING})
MAX_BODY = 16 * 1024
FIELDS = frozenset({"name", "return_to"})


def _error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


def _has_admin_key(request: web.Request) -> bool:
    key = request.app[CONFIG_KEY].admin.key
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if key is None or scheme.lower() != "bearer":
        return False
    # surrogateescape: aiohttp hands non-UTF-8 header bytes over as lone surrogates.
    presented = given.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(presented, key.reveal().encode())


def admin_only(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        allow_connection(request, None)  # a client key limited to some connections: 403
        if not _has_admin_key(request):
            return _error(
                401,
                "unauthorized",
                "the admin API needs Authorization: Bearer <admin key>",
                **{"WWW-Authenticate": 'Bearer realm="pleo-proxy admin"'},
            )
        return await handler(request)

    return checked


def summary(manager: TokenManager, *, configured: bool) -> dict[str, Any]:
    """One connection as the API shows it: its status, never a secret."""
    return {"name": manager.name, **manager.status(), "configured": configured}


async def list_connections(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    items = []
    for name in registry.names():  # loads those not in memory: an admin call, not per request
        manager = await registry.find(name)
        if manager is not None:
            items.append(summary(manager, configured=name in registry.configured))
    return web.json_response({"connections": items})


def _name_of(request: web.Request) -> str | web.Response:
    name = request.match_info["name"]
    if not is_valid_name(name):
        return _error(400, "invalid_connection_name", f"invalid connection name: {NAME_RULE}")
    return name


async def get_connection(request: web.Request) -> web.Response:
    name = _name_of(request)
    if isinstance(name, web.Response):
        return name
    registry = request.app[REGISTRY_KEY]
    manager = await registry.find(name)
    if manager is None:
        return _error(404, "unknown_connection", f"no connection named {name!r}")
    return web.json_response(summary(manager, configured=name in registry.configured))


async def delete_connection(request: web.Request) -> web.Response:
    name = _name_of(request)
    if isinstance(name, web.Response):
        return name
    if not await request.app[REGISTRY_KEY].delete(name):
        return _error(404, "unknown_connection", f"no connection named {name!r}")
    return web.json_response({"name": name, "deleted": True})


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, "body_too_large", f"the body must be at most {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return _error(413, "body_too_large", f"the body must be at most {MAX_BODY} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "invalid_json", "the body must be a JSON object")
    if not isinstance(doc, dict):
        return _error(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        return _error(
            400, "unknown_field", f"unknown field {unknown[0]!r}; expected name, return_to"
        )
    return doc


def return_to_problem(config: Config, value: object) -> str | None:
    """Why `value` may not be a return_to URL (None: it may)."""
    if not isinstance(value, str):
        return "return_to must be a string URL"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return "return_to must be an absolute http(s) URL without credentials"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "return_to may use plain http only for loopback hosts"
    origin = f"{parts.scheme}://{parts.netloc.lower()}"
    if origin not in config.connections.return_to_origins:
        return "return_to's origin is not in connections.return_to_origins"
    return None


async def create_connection(request: web.Request) -> web.Response:
    doc = await _json_object(request)
    if isinstance(doc, web.Response):
        return doc
    name = doc.get("name")
    if not isinstance(name, str) or not is_valid_name(name):
        return _error(400, "invalid_connection_name", f"name is required: {NAME_RULE}")
    return_to = doc.get("return_to")
    config = request.app[CONFIG_KEY]
    if return_to is not None and (problem := return_to_problem(config, return_to)):
        return _error(400, "return_to_not_allowed", problem)
    registry = request.app[REGISTRY_KEY]
    existing = await registry.find(name)
    if existing is not None and existing.state in CONNECTED:
        return _error(409, "already_connected", f"connection {name!r} is connected already")
    issued = await registry.issue_link(name, return_to=return_to)
    url = request.app[AUTHORISER_KEY].url_with_code(name, issued.code)
    body = {"name": name, "authorize_url": url, "expires_at": iso_utc(issued.expires_at)}
    return web.json_response(body, status=201 if issued.created else 200)


def connections_api_routes() -> list[web.RouteDef]:
    return [
        web.get(COLLECTION, admin_only(list_connections)),
        web.post(COLLECTION, admin_only(create_connection)),
        web.get(f"{COLLECTION}/{{name}}", admin_only(get_connection)),
        web.delete(f"{COLLECTION}/{{name}}", admin_only(delete_connection)),
    ]
