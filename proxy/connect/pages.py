"""The HTTP surface of the authorise flow: routes, handlers, cookies, HTML and its headers.

Owns the markup (proxy/templates/*.html, read with importlib.resources), the page
catalogue, and the headers every page carries (strict CSP, no framing, no referrer, no
caching); every value put into a page is HTML-escaped here. Must not hold flow state
(`authorise.Authoriser` does) or put an authorisation code, state or token in a page.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template

from aiohttp import web

from proxy.connect.messages import Message

COOKIE_PATH = "/_proxy/"
COOKIE_PREFIX = "pleo_proxy_flow_"
# The outcome of every page, so tests and scripts can tell pages apart without the prose.
PAGE_HEADER = "X-Pleo-Proxy-Page"


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
