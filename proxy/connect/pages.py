"""The HTTP surface of the authorise flow: routes, handlers, cookies, HTML and its headers.

Owns the markup (proxy/templates/*.html, read with importlib.resources), the page
catalogue, and the headers every page carries (strict CSP, no framing, no referrer, no
caching); every value put into a page is HTML-escaped here. Must not hold flow state
(`authorise.Authoriser` does) or put an authorisation code, state or token in a page.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import TYPE_CHECKING

from aiohttp import web
from yarl import URL

from proxy.config import CALLBACK_PATH
from proxy.connect.messages import BAD_PASTE, UNKNOWN_CONNECTION, Message, Refused
from proxy.names import DEFAULT_CONNECTION, is_valid_name
from proxy.urls import AUTHORIZE_PATH

if TYPE_CHECKING:
    # Only for the key's type: authorise imports this module, not the other way round.
    from proxy.connect.authorise import Authoriser

COOKIE_PATH = "/_proxy/"
COOKIE_PREFIX = "pleo_proxy_flow_"
# The outcome of every page, so tests and scripts can tell pages apart without the prose.
PAGE_HEADER = "X-Pleo-Proxy-Page"

AUTHORISER_KEY: web.AppKey[Authoriser] = web.AppKey("authoriser")


def flow_cookie_name(state: str) -> str:
    """One cookie per flow, so that two tabs' sign-ins do not overwrite each other's."""
    return COOKIE_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FlowStart:
    """What the button's POST answers: where to send the browser, and its flow cookie."""

    location: str
    state: str
    binding: str  # the cookie's value; state alone is not enough to finish the flow
    max_age: int


@dataclass(frozen=True)
class Html:
    """Markup already rendered by `render`: inserted as it is, never escaped again."""

    text: str


@cache
def _template(name: str) -> Template:
    text = (resources.files("proxy") / "templates" / name).read_text(encoding="utf-8")
    return Template(text)


def render(name: str, **values: str | Html) -> Html:
    """Fill template `name`; plain strings are HTML-escaped, `Html` is inserted as it is."""
    filled = {k: v.text if isinstance(v, Html) else html.escape(v) for k, v in values.items()}
    return Html(_template(name).substitute(filled))


def security_headers(form_origin: str) -> dict[str, str]:
    """Headers for every page: nothing external, no framing, no referrer, never cached.

    `form-action` must allow Pleo's authorise origin too: Chromium checks form-action
    against every redirect a form submission follows, and the button's POST is answered
    with a 302 to Pleo. The referrer policy is `same-origin`, not `no-referrer`: under
    `no-referrer` browsers send `Origin: null` even on a same-origin form POST (Fetch,
    "serializing a request origin"), which the guard rightly refuses as cross-site.
    `same-origin` still sends nothing to Pleo, so the page's setup code never leaves.
    """
    return {
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self' {form_origin}; frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


def page(title: str, content: Html, *, status: int, name: str, form_origin: str) -> web.Response:
    """A complete HTML page response with the security headers."""
    body = render("layout.html", title=title, content=content).text
    headers = security_headers(form_origin) | {PAGE_HEADER: name}
    return web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=headers
    )


def message_page(
    message: Message, *, form_origin: str, retry_url: str | None = None, detail: str = ""
) -> web.Response:
    """A refusal or error page; `detail` is a short non-secret addition (e.g. Pleo's code)."""
    explanation = f"{message.explanation} {detail}".strip()
    action = render("retry.html", url=retry_url) if retry_url else Html("")
    content = render(
        "message.html", heading=message.heading, explanation=explanation, action=action
    )
    return page(
        message.heading,
        content,
        status=message.status,
        name=message.name,
        form_origin=form_origin,
    )


@dataclass(frozen=True)
class AuthoriseView:
    """What the authorise page shows: all public configuration, plus the setup code."""

    environment: str
    client_id: str
    scopes: tuple[str, ...]
    redirect_uri: str
    setup_code: str
    connection: str  # empty for the default connection
    offer_paste: bool


def authorise_page(view: AuthoriseView, *, form_origin: str) -> web.Response:
    """The page with the button that starts the flow (and the paste form when needed)."""
    paste = render("paste.html", redirect_uri=view.redirect_uri) if view.offer_paste else Html("")
    content = render(
        "authorise.html",
        environment=view.environment,
        client_id=view.client_id,
        scopes=" ".join(view.scopes) or "(none configured)",
        redirect_uri=view.redirect_uri,
        setup=view.setup_code,
        connection=view.connection,
        paste=paste,
    )
    return page("Connect to Pleo", content, status=200, name="authorise", form_origin=form_origin)


def connected_page(company: str | None, *, proxy_url: str, form_origin: str) -> web.Response:
    """The success page: which company, and where applications should now send requests."""
    content = render("connected.html", company=company or "Pleo", proxy_url=proxy_url)
    return page("Connected", content, status=200, name="connected", form_origin=form_origin)


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
