"""The sandbox's test controls under /_sandbox/: knobs, revocation, grants and stats (JSON).

Owns only the translation between HTTP and SandboxState; tests in other processes use
these. No authentication, and never a token in an answer. Must not be mounted anywhere
but the sandbox.
"""

from __future__ import annotations

import dataclasses
import json

from aiohttp import web

from proxy.sandbox.state import STATE_KEY


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sandbox/knobs", get_knobs)
    app.router.add_post("/_sandbox/knobs", set_knobs)
    app.router.add_post("/_sandbox/revoke", revoke)
    app.router.add_get("/_sandbox/grants", grants)
    app.router.add_get("/_sandbox/stats", stats)
    app.router.add_post("/_sandbox/mint", mint)
    app.router.add_post("/_sandbox/reset-stats", reset_stats)


async def get_knobs(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[STATE_KEY].knobs))


async def set_knobs(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        changes = await request.json()
    except (ValueError, UnicodeDecodeError):
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    if not isinstance(changes, dict):
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    try:
        state.set_knobs(changes)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(dataclasses.asdict(state.knobs))


async def revoke(request: web.Request) -> web.Response:
    """No body or `{}`: every grant; `{"subject": "urn:..."}`: only that company's."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or set(body) - {"subject"}:
        return _bad_request('the body must be empty, {} or {"subject": "urn:..."}')
    subject = body.get("subject")
    # {"subject": null} is refused: a missing subject must not quietly revoke everything.
    if "subject" in body and (not isinstance(subject, str) or not subject):
        return _bad_request("subject: must be a non-empty string")
    revoked = request.app[STATE_KEY].revoke_grants(subject=subject)
    return web.json_response({"revoked_grants": revoked})


async def grants(request: web.Request) -> web.Response:
    return web.json_response({"grants": request.app[STATE_KEY].grants_json()}, dumps=_dumps)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats_json(), dumps=_dumps)


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset_stats()
    return web.json_response({"reset": True})


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)


async def mint(request: web.Request) -> web.Response:
    """Grants without the consent dance: `{"count": N, "ttl_min": s, "ttl_max": s}`."""
    state = request.app[STATE_KEY]
    try:
        doc = await request.json()
        count, low, high = int(doc["count"]), float(doc["ttl_min"]), float(doc["ttl_max"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return web.json_response({"error": "expected count, ttl_min and ttl_max"}, status=400)
    if not (0 < count <= 100_000 and 0 < low <= high):
        return web.json_response({"error": "count or lifetimes out of range"}, status=400)
    seed = int(doc.get("seed", 0))
    grants = state.mint(
        count, client_id=state.settings.client_id, ttl_min=low, ttl_max=high, seed=seed
    )
    return web.json_response({"grants": grants})
