"""The sandbox's resource server: Pleo-like API stand-ins behind bearer-token checks.

Owns the API routes, their scopes and their Pleo-shaped JSON. Bodies are streamed both
ways (downloads are written in chunks, uploads hashed as they arrive). Must not issue
or rotate tokens: state.py decides whether a token is alive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.sandbox.state import STATE_KEY, Grant

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_ATTACHMENT = 2 * 1024**3  # 2 GiB
# The download's deterministic content: byte i of the body is i % 256.
PATTERN = bytes(range(256))
CHUNK = PATTERN * 256  # 64 KiB; a whole number of periods, so every chunk starts at 0
EMPLOYEE_COUNT = 25
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
_FIRST = ("Astrid", "Bo", "Camilla", "Dan", "Emma", "Frederik", "Gry", "Hans", "Ida", "Jens")
_LAST = ("Andersen", "Berg", "Christensen", "Dahl", "Eriksen")
_NAMESPACE = uuid.UUID("8e1f5a4c-3b2d-4c6e-9f70-1a2b3c4d5e6f")


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/v1/introspect", protected(introspect))
    app.router.add_get("/v2/employees", protected(employees, scope="users:read"))
    app.router.add_get("/v1/attachments/{size}", protected(attachment))
    app.router.add_post("/v1/uploads", protected(upload))
    app.router.add_post("/v1/accounting-entries:search", protected(search_entries))
    app.router.add_route("*", "/v1/echo/{tail:.*}", protected(echo))


def api_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": kind, "message": message}, status=status)


def protected(handler: Handler, *, scope: str | None = None) -> Handler:
    """Wrap a handler with counting, latency, the bearer check and the scope check."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        state.count_api_request(request.path)
        await state.pause(state.knobs.latency)
        grant = _bearer_grant(request)
        if grant is None:
            return api_error(401, "unauthorized", "missing, invalid or expired access token")
        if state.take_api_401():
            return api_error(401, "unauthorized", "access token rejected (sandbox knob)")
        if scope is not None and scope not in grant.scopes:
            return api_error(403, "forbidden", f"the token lacks the scope {scope}")
        return await handler(request)

    return guarded


def _bearer_grant(request: web.Request) -> Grant | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return request.app[STATE_KEY].grant_for_access_token(token.strip())


def _request_grant(request: web.Request) -> Grant:
    grant = _bearer_grant(request)
    if grant is None:  # protected() already checked; a revocation in between is a 401
        raise web.HTTPUnauthorized(
            text=json.dumps({"type": "unauthorized", "message": "token revoked"}),
            content_type="application/json",
        )
    return grant


# -- introspect -----------------------------------------------------------------------


async def introspect(request: web.Request) -> web.Response:
    grant = _request_grant(request)
    data = {
        "authMethod": "OAUTH",
        "clientId": grant.client_id,
        "scope": " ".join(grant.scopes),
        "applicationName": "Sandbox",
        "subjectURN": grant.subject,
        "companyName": grant.company_name,
    }
    return web.json_response({"data": data})


# -- employees (cursor pagination) ----------------------------------------------------


def encode_cursor(index: int) -> str:
    """Base32 of the item index: matches Pleo's cursor pattern ^[A-Z2-7=~]+$."""
    return base64.b32encode(f"idx:{index}".encode()).decode("ascii")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.b32decode(cursor.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise ValueError("malformed cursor") from exc
    prefix, _, number = text.partition(":")
    if prefix != "idx" or not number.isdigit() or int(number) >= EMPLOYEE_COUNT:
        raise ValueError("malformed cursor")
    return int(number)


def employee(index: int, company_id: str) -> dict[str, Any]:
    first, last = _FIRST[index % len(_FIRST)], _LAST[index // len(_FIRST) % len(_LAST)]
    return {
        "id": str(uuid.uuid5(_NAMESPACE, f"employee-{index}")),
        "companyId": company_id,
        "firstName": first,
        "lastName": last,
        "email": f"{first.lower()}.{last.lower()}{index}@sandbox.example",
        "code": f"E{index:03d}",
    }


def _page_bounds(after: str | None, before: str | None, limit: int) -> tuple[int, int]:
    if after is not None and before is not None:
        raise ValueError("after and before cannot be combined")
    if after is not None:
        start = decode_cursor(after) + 1
        return start, min(start + limit, EMPLOYEE_COUNT)
    if before is not None:
        end = decode_cursor(before)
        return max(0, end - limit), end
    return 0, min(limit, EMPLOYEE_COUNT)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


async def employees(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = _limit(query.get("limit"))
        start, end = _page_bounds(query.get("after"), query.get("before"), limit)
    except ValueError as exc:
        return api_error(400, "bad_request", str(exc))
    company_id = request.app[STATE_KEY].settings.company_id
    pagination: dict[str, object] = {
        "hasNextPage": end < EMPLOYEE_COUNT,
        "hasPreviousPage": start > 0,
        "startCursor": encode_cursor(start) if end > start else None,
        "endCursor": encode_cursor(end - 1) if end > start else None,
        "total": EMPLOYEE_COUNT,
        "currentRequestPagination": {
            "after": query.get("after"),
            "before": query.get("before"),
            "limit": limit,
            "offset": None,
            "sortingKeys": [],
            "sortingOrder": [],
        },
    }
    data = [employee(i, company_id) for i in range(start, end)]
    return web.json_response({"data": data, "pagination": pagination})


# -- streaming download and upload ----------------------------------------------------


async def attachment(request: web.Request) -> web.StreamResponse:
    raw = request.match_info["size"]
    if not raw.isdigit() or int(raw) > MAX_ATTACHMENT:
        return api_error(400, "bad_request", f"size must be 0..{MAX_ATTACHMENT} bytes")
    size = int(raw)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    chunk = memoryview(CHUNK)
    remaining = size
    while remaining > 0:
        # write() waits for the transport to drain, so memory stays at about one chunk.
        part = chunk[: min(remaining, len(CHUNK))]
        await response.write(part)
        remaining -= len(part)
    await response.write_eof()
    return response


async def _hash_body(request: web.Request) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    async for data in request.content.iter_any():
        digest.update(data)
        length += len(data)
    return digest.hexdigest(), length


async def upload(request: web.Request) -> web.Response:
    sha256, length = await _hash_body(request)
    result = {"sha256": sha256, "length": length}
    # How the body arrived (Content-Length or chunked), so proxy tests can check streaming.
    request.app[STATE_KEY].stats.last_upload = {
        **result,
        "content_type": request.content_type,
        "content_length": request.content_length,
        "chunked": "chunked" in request.headers.get("Transfer-Encoding", "").lower(),
    }
    return web.json_response(result)


# -- echoes ---------------------------------------------------------------------------


async def search_entries(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return api_error(400, "bad_request", "the body must be JSON")
    echo = {"query": {k: request.query.getall(k) for k in request.query}, "body": body}
    pagination = {"hasNextPage": False, "hasPreviousPage": False, "total": 0}
    return web.json_response({"data": [], "pagination": pagination, "request": echo})


async def echo(request: web.Request) -> web.Response:
    sha256, length = await _hash_body(request)
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    body = {
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": headers,
        "body_sha256": sha256,
        "body_length": length,
    }
    response = web.json_response(body)
    # Two Set-Cookie headers, so tests can check repeated response headers survive.
    response.headers.add("Set-Cookie", "sbx_a=1; Path=/")
    response.headers.add("Set-Cookie", "sbx_b=2; Path=/")
    return response
