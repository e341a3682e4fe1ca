"""Connecting a customer: setup codes, connect links, sign-in flows and their completion.

Owns, per connection, the setup code a configured connection makes for itself (and the
`authorize-url` file that carries it), the check of connect links stored by `pleo-proxy
connect` or the admin API, the pending flows, and the hand-over of a fresh `TokenSet` to
the registry. One callback serves every connection: the state names it. Must not forward
API traffic, write the token store itself, or let a code, state, verifier or token reach
a log line or a page.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.connect import flows as flow_rules, messages, pages, pkce
from proxy.connect.flows import (
    FLOW_LIFETIME,
    MAX_PENDING_FLOWS as MAX_PENDING_FLOWS,
    Flow,
    PendingFlows,
)
from proxy.connect.pages import FlowStart, flow_cookie_name
from proxy.connect.urlfile import (
    read_authorize_url as read_authorize_url,
    remove_file,
    url_file,
    write_private_file,
)
from proxy.errors import ClientRejected, OAuthError, ProxyError, TransientOAuthError
from proxy.lifecycle.grants import NewGrant, authorize_redirect, grant_from_code
from proxy.lifecycle.manager import TokenManager, TokenState
from proxy.lifecycle.registry import Registry, code_hash
from proxy.names import DEFAULT_CONNECTION
from proxy.secret import Secret
from proxy.tokenset import Link
from proxy.urls import (
    authorise_page_url,
    callback_reaches_proxy,
    origin_of,
    proxy_origin,
    url_with_code,
)

__all__ = ["MAX_PENDING_FLOWS", "Authoriser", "read_authorize_url"]

logger = logging.getLogger("proxy.authorise")

CONNECTED_STATES = frozenset({TokenState.AUTHORISED, TokenState.REFRESHING})


@dataclass(frozen=True)
class Completion:
    """A finished sign-in: whose, which company, and where the browser goes next."""

    connection: str
    company: str | None
    return_to: str | None


class Authoriser:
    """Setup codes, connect links and sign-ins of every connection."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._registry = registry
        self._session = session
        self._clock = clock
        self._flows: dict[str, PendingFlows] = {}
        self._codes: dict[str, str] = {}  # setup codes configured connections made
        self._last_state: dict[str, TokenState] = {}
        self.form_origin = origin_of(config.pleo.authorize_url)

    # -- addresses -------------------------------------------------------------------

    def page_url(self, connection: str = DEFAULT_CONNECTION) -> str:
        """The authorise page URL without a code (safe to show any client)."""
        return authorise_page_url(self._config, connection)

    def url_with_code(self, connection: str, code: str) -> str:
        return url_with_code(self._config, connection, code)

    def setup_url(self, connection: str = DEFAULT_CONNECTION) -> str | None:
        """The page URL with the connection's own setup code; None while it needs none."""
        code = self._codes.get(connection)
        return None if code is None else self.url_with_code(connection, code)

    def proxy_url(self, connection: str = DEFAULT_CONNECTION) -> str:
        """Where applications send this connection's requests (shown on the success page)."""
        base = proxy_origin(self._config)
        return base if connection == DEFAULT_CONNECTION else f"{base}/c/{connection}"

    @property
    def cookie_secure(self) -> bool:
        return URL(self._config.pleo.redirect_uri).scheme == "https"

    def connected(self, connection: str) -> bool:
        manager = self._registry.get(connection)
        return manager is not None and manager.state in CONNECTED_STATES

    # -- setup codes of configured connections --------------------------------------

    def watch(self, manager: TokenManager, configured: bool) -> None:
        """Registry hook: configured connections make their own setup codes, as always;
        the others are connected through links made on request (admin API, `connect`)."""
        if configured:
            name = manager.name
            manager.subscribe(lambda state: self.on_state(name, state))

    def on_state(self, connection: str, state: TokenState) -> None:
        """A new setup code on entering a state that needs consent.

        Called synchronously by the manager, so the URL file is written synchronously too:
        a few bytes, once per state change, and done before anyone can ask for the URL.
        """
        previous = self._last_state.get(connection)
        self._last_state[connection] = state
        if state in CONNECTED_STATES:
            self._invalidate(connection)
        elif state != previous:
            self._new_setup_code(connection)

    def _new_setup_code(self, connection: str) -> None:
        self._flows_of(connection).clear()
        self._codes[connection] = pkce.new_setup_code()
        url = self.setup_url(connection)
        # The one URL allowed in a log: it is how the operator gets in. Logged once per code.
        if connection == DEFAULT_CONNECTION:
            logger.warning("Pleo is not connected; open %s to authorise this proxy", url)
        else:
            logger.warning(
                "connection %s is not connected; open %s to authorise it", connection, url
            )
        path = url_file(self._config, connection)
        try:
            write_private_file(path, f"{url}\n")
        except OSError as exc:
            logger.error("could not write %s: %s", path, exc.strerror)

    def _invalidate(self, connection: str) -> None:
        self._flows_of(connection).clear()
        if self._codes.pop(connection, None) is None:
            return
        path = url_file(self._config, connection)
        try:
            remove_file(path)
        except OSError as exc:
            logger.error("could not remove %s: %s", path, exc.strerror)

    # -- checking a code -------------------------------------------------------------

    async def check_setup(self, connection: str, given: str | None) -> Link | None:
        """Raise Refused unless the page may be used with `given`; the link it matched."""
        manager = await self._registry.find(connection)
        if manager is None:
            raise messages.Refused(messages.UNKNOWN_CONNECTION)
        if manager.state in CONNECTED_STATES:
            raise messages.Refused(messages.ALREADY_CONNECTED)
        if given is None:
            raise messages.Refused(messages.NOT_ALLOWED)
        own = self._codes.get(connection)
        if own is not None and hmac.compare_digest(given.encode(), own.encode()):
            return None
        # A link made by another process since we last looked: read the store now.
        link = await manager.stored_link()
        if link is None or not hmac.compare_digest(code_hash(given), link.code_hash):
            raise messages.Refused(messages.NOT_ALLOWED)
        if link.expires_at <= self._clock():
            raise messages.Refused(messages.LINK_EXPIRED)
        return link

    def view(self, connection: str, code: str) -> pages.AuthoriseView:
        pleo = self._config.pleo
        return pages.AuthoriseView(
            environment=pleo.environment,
            client_id=pleo.client_id or "(not configured)",
            scopes=pleo.scopes,
            redirect_uri=pleo.redirect_uri,
            setup_code=code,
            connection="" if connection == DEFAULT_CONNECTION else connection,
            offer_paste=not callback_reaches_proxy(self._config),
        )

    # -- the flow --------------------------------------------------------------------

    def _flows_of(self, connection: str) -> PendingFlows:
        flows = self._flows.get(connection)
        if flows is None:
            flows = self._flows[connection] = PendingFlows(self._clock)
        return flows

    def start_flow(self, connection: str, link: Link | None) -> FlowStart:
        """Create a pending flow and the redirect to Pleo's authorise endpoint."""
        state = flow_rules.new_state(connection)
        verifier, binding = pkce.new_verifier(), pkce.new_state()
        expires_at = self._clock() + FLOW_LIFETIME
        return_to = link.return_to if link is not None else None
        flow = Flow(connection, Secret(verifier), Secret(binding), expires_at, return_to)
        self._flows_of(connection).add(state, flow)
        location = authorize_redirect(self._config, state=state, verifier=verifier)
        return FlowStart(location, state, binding, int(FLOW_LIFETIME))

    def take_flow(self, state: str | None, cookies: Mapping[str, str]) -> Flow:
        """The flow `state` names, used up; only if this browser holds its cookie."""
        if not state:
            raise messages.Refused(messages.MISSING_STATE)
        connection = flow_rules.connection_of(state)
        flows = self._flows.get(connection) if connection is not None else None
        flow = flows.peek(state) if flows is not None else None
        if flows is None or flow is None:
            raise messages.Refused(messages.UNKNOWN_STATE)
        cookie = cookies.get(flow_cookie_name(state), "")
        # Checked before the flow is used up: a request without the cookie cannot burn it.
        if not hmac.compare_digest(cookie.encode(), flow.binding.reveal().encode()):
            raise messages.Refused(messages.NO_COOKIE)
        flows.discard(state)
        return flow

    async def complete(self, query: Mapping[str, str], cookies: Mapping[str, str]) -> Completion:
        """Finish a sign-in from Pleo's answer. Raises Refused."""
        flow = self.take_flow(query.get("state"), cookies)
        try:
            company = await self._finish(flow, query)
        except messages.Refused as refused:
            refused.connection, refused.return_to = flow.connection, flow.return_to
            raise
        self._invalidate(flow.connection)
        return Completion(flow.connection, company, flow.return_to)

    async def _finish(self, flow: Flow, query: Mapping[str, str]) -> str | None:
        error = query.get("error")
        if error is not None:
            raise messages.authorization_error(error)
        code = query.get("code")
        if not code:
            raise messages.Refused(messages.MISSING_CODE, retry=True)
        if await self._registry.find(flow.connection) is None:
            # Deleted while the customer was at Pleo: the sign-in must not bring it back.
            raise messages.Refused(messages.UNKNOWN_CONNECTION)
        grant = await self._exchange(Secret(code), flow)
        try:
            await self._registry.install(
                flow.connection,
                grant.tokens,
                subject=grant.subject,
                company_name=grant.company_name,
            )
        except ProxyError as exc:
            logger.error("could not install the new tokens: %s", exc.code)
            raise messages.Refused(messages.SAVE_FAILED, retry=True) from None
        return grant.company_name

    async def _exchange(self, code: Secret, flow: Flow) -> NewGrant:
        try:
            return await grant_from_code(
                self._session, self._config, code=code, verifier=flow.verifier, now=self._clock()
            )
        except ClientRejected:
            raise messages.Refused(messages.CLIENT_REJECTED) from None
        except TransientOAuthError:
            raise messages.Refused(messages.PLEO_UNAVAILABLE, retry=True) from None
        except OAuthError:  # invalid_grant: the code expired, was used, or does not match
            raise messages.Refused(messages.CODE_REFUSED, retry=True) from None

    def retry_url(self, connection: str | None) -> str | None:
        name = connection or DEFAULT_CONNECTION
        return None if self.connected(name) else self.setup_url(name)
