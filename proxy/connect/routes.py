"""The HTTP surface of connecting: `/_proxy/authorize` and `/_proxy/callback` handlers.

Reads the request (setup code, connection, form, cookies), asks the `Authoriser`, and
answers with a page from `pages`, a 302 to Pleo, or a 303 to a link's `return_to`.
Must not hold flow state or speak OAuth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from yarl import URL

from proxy.config import CALLBACK_PATH
from proxy.connect.authorise import Authoriser
from proxy.connect.messages import BAD_PASTE, UNKNOWN_CONNECTION, Refused
from proxy.connect.pages import (
    COOKIE_PATH,
    authorise_page,
    connected_page,
    flow_cookie_name,
    message_page,
    security_headers,
)
from proxy.http.keys import CLOCK_KEY, CONFIG_KEY, REGISTRY_KEY, UPSTREAM_SESSION_KEY
from proxy.names import DEFAULT_CONNECTION, is_valid_name
from proxy.urls import AUTHORIZE_PATH

AUTHORISER_KEY = web.AppKey("authoriser", Authoriser)


def _refusal_page(authoriser: Authoriser, refused: Refused) -> web.Response:
    if refused.return_to is not None and refused.connection is not None:
        return return_to_redirect(refused.return_to, refused.connection, refused.result)
    return message_page(
        refused.message,
        form_origin=authoriser.form_origin,
        retry_url=authoriser.retry_url(refused.connection) if refused.retry else None,
        detail=refused.detail,
    )


def return_to_redirect(return_to: str, connection: str, result: str) -> web.Response:
    """303 to the partner's page with `?connection=NAME&result=connected|denied|error`."""
    location = URL(return_to).update_query(connection=connection, result=result)
    return web.Response(
        status=303, headers={"Location": str(location), "Cache-Control": "no-store"}
    )


def _connection_of(value: object) -> str:
    """The connection a page request names (`connection=`); the default when absent."""
    if value is None or value == "":
        return DEFAULT_CONNECTION
    if not isinstance(value, str) or not is_valid_name(value):
        raise Refused(UNKNOWN_CONNECTION)
    return value


async def get_authorize(request: web.Request) -> web.Response:
    authoriser = request.app[AUTHORISER_KEY]
    given = request.query.get("setup")
    try:
        connection = _connection_of(request.query.get("connection"))
        await authoriser.check_setup(connection, given)
    except Refused as refused:
        return _refusal_page(authoriser, refused)
    assert given is not None  # noqa: S101 - check_setup refused otherwise
    return authorise_page(authoriser.view(connection, given), form_origin=authoriser.form_origin)


async def post_authorize(request: web.Request) -> web.Response:
    authoriser = request.app[AUTHORISER_KEY]
    form = await request.post()
    setup = form.get("setup")
    try:
        connection = _connection_of(form.get("connection") or request.query.get("connection"))
        link = await authoriser.check_setup(connection, setup if isinstance(setup, str) else None)
    except Refused as refused:
        return _refusal_page(authoriser, refused)
    start = authoriser.start_flow(connection, link)
    headers = security_headers(authoriser.form_origin) | {"Location": start.location}
    response = web.Response(status=302, headers=headers)
    response.set_cookie(
        flow_cookie_name(start.state),
        start.binding,
        max_age=start.max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Lax",  # sent on Pleo's top-level redirect back to us, not on cross-site POSTs
        secure=authoriser.cookie_secure,
    )
    return response


async def _finish(request: web.Request, query: Mapping[str, str]) -> web.Response:
    authoriser = request.app[AUTHORISER_KEY]
    try:
        done = await authoriser.complete(query, request.cookies)
    except Refused as refused:
        return _refusal_page(authoriser, refused)
    if done.return_to is not None:
        response = return_to_redirect(done.return_to, done.connection, "connected")
    else:
        response = connected_page(
            done.company,
            proxy_url=authoriser.proxy_url(done.connection),
            form_origin=authoriser.form_origin,
        )
    state = query.get("state") or ""
    response.del_cookie(flow_cookie_name(state), path=COOKIE_PATH)
    return response


async def get_callback(request: web.Request) -> web.Response:
    """Pleo's redirect back (a cross-site top-level navigation, by design)."""
    return await _finish(request, request.query)


async def head_callback(request: web.Request) -> web.Response:
    return web.Response(status=405, headers={"Allow": "GET, POST"})


async def post_callback(request: web.Request) -> web.Response:
    """The paste flow: the address Pleo sent the browser to, checked exactly as a GET."""
    form = await request.post()
    pasted = form.get("redirect_url")
    try:
        query = URL(pasted.strip()).query if isinstance(pasted, str) else None
    except ValueError:
        query = None
    if not query:
        authoriser = request.app[AUTHORISER_KEY]
        return _refusal_page(authoriser, Refused(BAD_PASTE))
    return await _finish(request, query)


def authorise_routes() -> list[web.RouteDef]:
    """GET+POST /_proxy/authorize and GET+POST /_proxy/callback."""
    return [
        web.get(AUTHORIZE_PATH, get_authorize),
        web.post(AUTHORIZE_PATH, post_authorize),
        # No implicit HEAD: a link checker's HEAD must not use up the flow.
        web.get(CALLBACK_PATH, get_callback, allow_head=False),
        web.head(CALLBACK_PATH, head_callback),
        web.post(CALLBACK_PATH, post_callback),
    ]


async def authoriser_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: build the Authoriser and let it watch the registry's connections.

    Register it after the registry's context, so that the first state it sees is the one
    loaded from the store (no setup URL is made for a connection that is already connected).
    """
    registry = app[REGISTRY_KEY]
    authoriser = Authoriser(
        app[CONFIG_KEY], registry, app[UPSTREAM_SESSION_KEY], clock=app[CLOCK_KEY]
    )
    app[AUTHORISER_KEY] = authoriser
    registry.on_added(authoriser.watch)
    yield
