"""The proxy's own addresses, derived from the config: its origin, the authorise page's.

One place, so the page, the 503 bodies, `status` and the guard agree on them.
No I/O; imports nothing from the request path.
"""

from __future__ import annotations

from yarl import URL

from proxy.config import CALLBACK_PATH, Config
from proxy.names import DEFAULT_CONNECTION

AUTHORIZE_PATH = "/_proxy/authorize"


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of `url`, as browsers send it in `Origin` and CSP writes it."""
    return str(URL(url).origin())


def proxy_origin(config: Config) -> str:
    """Where applications reach the proxy, from `listen`."""
    host = config.listen.host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard listen is reachable locally
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{config.listen.scheme}://{host}:{config.listen.port}"


def callback_reaches_proxy(config: Config) -> bool:
    """True when Pleo sends the browser straight back to this proxy's callback route."""
    return URL(config.pleo.redirect_uri).path == CALLBACK_PATH


def page_origin(config: Config) -> str:
    """Scheme, host and port of the authorise page.

    Those of the redirect URI when it is our callback, so that the state cookie set by
    the page is sent with the callback; otherwise the proxy's own (paste flow). A pages
    listener behind a public front is reached at `pages.public_url`.
    """
    if config.pages.public_url is not None:
        return origin_of(config.pages.public_url)
    if callback_reaches_proxy(config):
        return origin_of(config.pleo.redirect_uri)
    return proxy_origin(config)


def authorise_page_url(config: Config, connection: str = DEFAULT_CONNECTION) -> str:
    """The authorise page without its setup code: what 503 bodies and `status` name.

    The default connection's page has no query, as it always had; another's names it.
    """
    url = page_origin(config) + AUTHORIZE_PATH
    if connection != DEFAULT_CONNECTION:
        url = str(URL(url).with_query(connection=connection))
    return url


def url_with_code(config: Config, connection: str, code: str) -> str:
    """The connection's authorise page with a setup code or connect-link code."""
    return str(URL(authorise_page_url(config, connection)).update_query(setup=code))
