"""Requests for the catch-all route go straight to the front middleware and its handler.

Owns the shortcut past aiohttp's router: a request whose target cannot match any of our
own routes (each has `/_proxy` in its path) gets the match the router would have made,
made once, and is handed to the front middleware with the catch-all handler (the
forwarder; the pages listener's not-found). Everything else (our endpoints, a target
with `%`, a request with `Expect`) goes through the application as before. Resolving
the route, freezing a fresh match and wrapping the middleware chain were a few per cent
of a small GET. Must not decide anything the router, guard or handlers decide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.http.keys import FRONT_KEY

RESERVED_MARK = "/_proxy"
CATCH_ALL = "/{tail}"  # the canonical form of "/{tail:.*}"
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def install_shortcut(runner: web.BaseRunner) -> None:
    """After `runner.setup()`, before its sites start: its server takes the shortcut.

    (A connection keeps the handler it was accepted with.)
    """
    server = runner.server
    if server is None:
        raise RuntimeError("install the shortcut after runner.setup()")
    app = getattr(runner, "app", None)
    if not isinstance(app, web.Application):
        raise TypeError("the shortcut is for an application's runner")
    server.request_handler = shortcut(app, app[FRONT_KEY])


def shortcut(app: web.Application, front: Middleware) -> ServerHandler:
    """The server's request handler for `app`, which has a catch-all route.

    Raises ValueError if another route could match a path without RESERVED_MARK: the
    shortcut would take its requests.
    """
    route = _catch_all(app)
    # One match for every request: its "tail" is not the request's (nothing reads it).
    match = web.UrlMappingMatchInfo({"tail": ""}, route)
    match.add_app(app)
    match.freeze()
    handler: Handler = route.handler
    through_app = app._handle

    async def handle(base: web.BaseRequest) -> web.StreamResponse:
        request = cast(web.Request, base)  # what the app's request factory makes
        if not _for_catch_all(request):
            return await through_app(request)
        request._match_info = match
        return await front(request, handler)

    return handle


def _for_catch_all(request: web.Request) -> bool:
    # The raw target, so no percent-decoding can hide the mark ("%" goes the long way);
    # dot segments only remove whole segments, so they cannot make the mark appear.
    path = request.raw_path.partition("?")[0]
    return RESERVED_MARK not in path and "%" not in path and "Expect" not in request.headers


def _catch_all(app: web.Application) -> web.AbstractRoute:
    found: list[web.AbstractRoute] = []
    for resource in app.router.resources():
        pattern = resource.canonical
        for route in resource:
            if pattern == CATCH_ALL and route.method == "*":
                found.append(route)
            elif RESERVED_MARK not in pattern:
                raise ValueError(f"route {pattern} would be taken by the catch-all shortcut")
    if len(found) != 1:
        raise ValueError("the application has no single catch-all route")
    return found[0]
