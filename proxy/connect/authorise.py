"""The one-time authorise page and the OAuth callback: `/_proxy/authorize`, `/_proxy/callback`.

Owns the setup code (and the `authorize-url` file that carries it), the pending flows
(state, PKCE verifier, browser-binding cookie, expiry) and the hand-over of a fresh
`TokenSet` to `tokens.install`. Must not forward API traffic, write the token store,
or let an authorisation code, state, verifier or token reach a log line or a page.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.connect import pages, pkce
from proxy.connect.pages import (
    AUTHORISER_KEY,
    FlowStart,
    authorise_routes,
    flow_cookie_name,
)
from proxy.errors import (
    ClientRejected,
    OAuthError,
    ProxyError,
    TransientOAuthError,
)
from proxy.http.keys import CLOCK_KEY, CONFIG_KEY, TOKENS_KEY, UPSTREAM_SESSION_KEY
from proxy.lifecycle import oauth
from proxy.lifecycle.manager import TokenManager, TokenState
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from proxy.urls import (
    authorise_page_url,
    callback_reaches_proxy,
    origin_of,
    proxy_origin,
)

__all__ = [
    "AUTHORISER_KEY",
    "Authoriser",
    "authorise_routes",
    "authoriser_ctx",
    "read_authorize_url",
]

logger = logging.getLogger("proxy.authorise")

URL_FILE_NAME = "authorize-url"
FLOW_LIFETIME = 600.0  # seconds a started sign-in may take at Pleo
MAX_PENDING_FLOWS = 16  # a few double clicks; bounded so a loop cannot grow memory
CONNECTED_STATES = frozenset({TokenState.AUTHORISED, TokenState.REFRESHING})


@dataclass(frozen=True)
class Flow:
    """One started sign-in, kept server-side and keyed by its `state`."""

    verifier: Secret
    binding: Secret  # the value of the browser's cookie for this flow
    expires_at: float


def url_file(config: Config) -> Path:
    return config.tokens.state_dir / URL_FILE_NAME


def read_authorize_url(config: Config) -> str | None:
    """The current setup URL as written by a running proxy, or None (none is needed)."""
    try:
        text = url_file(config).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, mode 0600: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    with suppress(FileNotFoundError):
        _fsync_dir(path.parent)


class PendingFlows:
    """Started sign-ins by state: single use, expiring, at most MAX_PENDING_FLOWS."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._flows: dict[str, Flow] = {}

    def add(self, state: str, flow: Flow) -> None:
        self._prune()
        while len(self._flows) >= MAX_PENDING_FLOWS:
            # dicts keep insertion order: the oldest flow makes room.
            del self._flows[next(iter(self._flows))]
        self._flows[state] = flow

    def peek(self, state: str) -> Flow | None:
        """The live flow for `state` (without using it up)."""
        self._prune()
        return self._flows.get(state)

    def discard(self, state: str) -> None:
        self._flows.pop(state, None)

    def clear(self) -> None:
        self._flows.clear()

    def _prune(self) -> None:
        now = self._clock()
        for state in [s for s, f in self._flows.items() if f.expires_at <= now]:
            del self._flows[state]


class Authoriser:
    """The setup code, the pending flows, and the completion of a sign-in."""

    def __init__(
        self,
        config: Config,
        tokens: TokenManager,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._session = session
        self._clock = clock
        self._flows = PendingFlows(clock)
        self._setup_code: str | None = None
        self._last_state: TokenState | None = None
        self.form_origin = origin_of(config.pleo.authorize_url)

    # -- the setup code -------------------------------------------------------------

    def page_url(self) -> str:
        """The authorise page URL without the setup code (safe to show any client)."""
        return authorise_page_url(self._config)

    def setup_url(self) -> str | None:
        """The page URL with the current setup code; None while connected."""
        if self._setup_code is None:
            return None
        return str(URL(self.page_url()).with_query(setup=self._setup_code))

    def proxy_url(self) -> str:
        """Where applications send their requests (shown on the success page)."""
        return proxy_origin(self._config)

    @property
    def cookie_secure(self) -> bool:
        return URL(self._config.pleo.redirect_uri).scheme == "https"

    @property
    def connected(self) -> bool:
        return self._tokens.state in CONNECTED_STATES

    def on_state(self, state: TokenState) -> None:
        """TokenManager listener: a new setup code on entering a state that needs consent.

        Called synchronously by the manager, so the URL file is written synchronously too:
        a few bytes, once per state change, and done before anyone can ask for the URL.
        """
        previous, self._last_state = self._last_state, state
        if state in CONNECTED_STATES:
            self._invalidate()
        elif state != previous:
            self._new_setup_code()

    def check_setup(self, given: str | None) -> None:
        """Raise Refused unless the page may be used with `given` as setup code."""
        if self.connected:
            raise pages.Refused(pages.ALREADY_CONNECTED)
        current = self._setup_code
        if current is None or given is None:
            raise pages.Refused(pages.NOT_ALLOWED)
        if not hmac.compare_digest(given.encode(), current.encode()):
            raise pages.Refused(pages.NOT_ALLOWED)

    def view(self) -> pages.AuthoriseView:
        pleo = self._config.pleo
        return pages.AuthoriseView(
            environment=pleo.environment,
            client_id=pleo.client_id or "(not configured)",
            scopes=pleo.scopes,
            redirect_uri=pleo.redirect_uri,
            setup_code=self._setup_code or "",
            offer_paste=not callback_reaches_proxy(self._config),
        )

    def _new_setup_code(self) -> None:
        self._flows.clear()
        self._setup_code = pkce.new_setup_code()
        url = self.setup_url()
        # The one URL allowed in a log: it is how the operator gets in. Logged once per code.
        logger.warning("Pleo is not connected; open %s to authorise this proxy", url)
        try:
            write_private_file(url_file(self._config), f"{url}\n")
        except OSError as exc:
            logger.error("could not write %s: %s", url_file(self._config), exc.strerror)

    def _invalidate(self) -> None:
        self._flows.clear()
        if self._setup_code is None:
            return
        self._setup_code = None
        try:
            remove_file(url_file(self._config))
        except OSError as exc:
            logger.error("could not remove %s: %s", url_file(self._config), exc.strerror)

    # -- the flow ---------------------------------------------------------------------

    def start_flow(self) -> FlowStart:
        """Create a pending flow and the redirect to Pleo's authorise endpoint."""
        state, verifier, binding = pkce.new_state(), pkce.new_verifier(), pkce.new_state()
        expires_at = self._clock() + FLOW_LIFETIME
        self._flows.add(state, Flow(Secret(verifier), Secret(binding), expires_at))
        location = oauth.build_authorize_url(
            self._config.pleo, state=state, code_challenge=pkce.challenge_s256(verifier)
        )
        return FlowStart(location, state, binding, int(FLOW_LIFETIME))

    def take_flow(self, state: str | None, cookies: Mapping[str, str]) -> Flow:
        """The flow `state` names, used up; only if this browser holds its cookie."""
        if not state:
            raise pages.Refused(pages.MISSING_STATE)
        flow = self._flows.peek(state)
        if flow is None:
            raise pages.Refused(pages.UNKNOWN_STATE)
        cookie = cookies.get(flow_cookie_name(state), "")
        # Checked before the flow is used up: a request without the cookie cannot burn it.
        if not hmac.compare_digest(cookie.encode(), flow.binding.reveal().encode()):
            raise pages.Refused(pages.NO_COOKIE)
        self._flows.discard(state)
        return flow

    async def complete(self, query: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """Finish a sign-in from Pleo's answer; the company name on success. Raises Refused."""
        flow = self.take_flow(query.get("state"), cookies)
        error = query.get("error")
        if error is not None:
            raise pages.authorization_error(error)
        code = query.get("code")
        if not code:
            raise pages.Refused(pages.MISSING_CODE, retry=True)
        tokens = await self._exchange(Secret(code), flow)
        subject, company = await self._identify(tokens)
        try:
            await self._tokens.install(tokens, subject=subject, company_name=company)
        except ProxyError as exc:
            logger.error("could not install the new tokens: %s", exc.code)
            raise pages.Refused(pages.SAVE_FAILED, retry=True) from None
        self._invalidate()
        return company

    async def _exchange(self, code: Secret, flow: Flow) -> TokenSet:
        try:
            return await oauth.exchange_code(
                self._session,
                self._config.pleo,
                code=code,
                code_verifier=flow.verifier.reveal(),
                timeout=self._config.timeouts.token_request,
                now=self._clock(),
            )
        except ClientRejected:
            raise pages.Refused(pages.CLIENT_REJECTED) from None
        except TransientOAuthError:
            raise pages.Refused(pages.PLEO_UNAVAILABLE, retry=True) from None
        except OAuthError:  # invalid_grant: the code expired, was used, or does not match
            raise pages.Refused(pages.CODE_REFUSED, retry=True) from None

    async def _identify(self, tokens: TokenSet) -> tuple[str | None, str | None]:
        """Best effort: which company the grant is for. Failure does not fail the sign-in."""
        bearer = Secret(f"{tokens.token_type} {tokens.access_token.reveal()}")
        try:
            subject = await oauth.introspect(
                self._session,
                self._config.pleo,
                authorization=bearer,
                timeout=self._config.timeouts.token_request,
            )
        except ProxyError as exc:
            logger.warning("could not look up the connected company: %s", exc.code)
            return None, None
        return subject.subject_urn, subject.company_name

    def retry_url(self) -> str | None:
        return None if self.connected else self.setup_url()


async def authoriser_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: build the Authoriser and subscribe it to the token manager.

    Register it after the token manager's context, so that the first state it sees is the
    one loaded from the store (no setup URL is made for a proxy that is already connected).
    """
    authoriser = Authoriser(
        app[CONFIG_KEY], app[TOKENS_KEY], app[UPSTREAM_SESSION_KEY], clock=app[CLOCK_KEY]
    )
    app[AUTHORISER_KEY] = authoriser
    app[TOKENS_KEY].subscribe(authoriser.on_state)
    yield
