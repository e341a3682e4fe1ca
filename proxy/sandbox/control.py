"""The sandbox's test controls under /_sandbox/: knobs, revocation and stats (JSON, no auth).

Owns only the translation between HTTP and SandboxState; tests in other processes use
these. Must not be mounted anywhere but the sandbox.
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
    app.router.add_get("/_sandbox/stats", stats)
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
    revoked = request.app[STATE_KEY].revoke_all()
    return web.json_response({"revoked_grants": revoked})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats_json(), dumps=_dumps)


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset_stats()
    return web.json_response({"reset": True})


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)
