"""The token manager: the one owner of the token state machine, refresh and retries.

States: unauthorised → authorised ⇄ refreshing → reauthorization_required.
Refresh sequence: single-flight in the process → store lock (bounded) → re-read the
store (another process may have refreshed) → mark the refresh in the store → refresh
at Pleo → persist (fsync) → release → hand out.
Must not know file formats, Redis commands or aiohttp server objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import Config, Timeouts
from proxy.errors import (
    ClientRejected,
    LockTimeout,
    OAuthError,
    ReauthorizationRequired,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle import oauth
from proxy.lifecycle.rules import (
    BACKGROUND_TICK as BACKGROUND_TICK,
    BACKOFF_CAP,
    INTERRUPTED_REASON as INTERRUPTED_REASON,
    MAX_ATTEMPTS as MAX_ATTEMPTS,
    REREAD_INTERVAL as REREAD_INTERVAL,
    RefreshRequest as RefreshRequest,
    StateListener as StateListener,
    TokenEvents as TokenEvents,
    TokenState as TokenState,
    backoff_delay as backoff_delay,
    bearer as bearer,
    iso_utc,
    refresh_margin as refresh_margin,
    with_scopes,
)
from proxy.secret import Secret
from proxy.store import TokenStore
from proxy.tokenset import StoredState, TokenSet
from proxy.urls import authorise_page_url

log = logging.getLogger("proxy.tokens")


class TokenManager:
    """Hands out the current access token and refreshes it; a `CredentialSource`."""

    def __init__(
        self,
        config: Config,
        store: TokenStore,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        events: TokenEvents | None = None,
    ) -> None:
        self._config = config
        self._events = events if events is not None else TokenEvents()
        self._store = store
        self._session = session
        self._clock = clock
        self._listeners: list[StateListener] = []
        self._state = TokenState.UNAUTHORISED
        self._stored: StoredState | None = None
        self._inflight: asyncio.Future[TokenSet] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_used = 0.0
        self._last_reread = float("-inf")
        self._client_rejected: str | None = None
        self._last_transient: str | None = None
        self._unsaved: StoredState | None = None  # refreshed tokens whose write failed
        self._started = False
        self._page_url = authorise_page_url(config)

    def use_timeouts(self, timeouts: Timeouts) -> None:
        """Timeouts from a reloaded configuration (token requests and lock waits)."""
        self._config = dataclasses.replace(self._config, timeouts=timeouts)

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> TokenState:
        return self._state

    @property
    def tokens(self) -> TokenSet | None:
        return self._stored.tokens if self._stored else None

    def subscribe(self, listener: StateListener) -> None:
        """Call `listener(state)` on every state change (and once now, with the current state)."""
        self._listeners.append(listener)
        listener(self._state)

    def _set_state(self, state: TokenState) -> None:
        if state is self._state:
            return
        log.info(
            "token state: %s → %s",
            self._state.value,
            state.value,
            extra={"fields": {"event": "state", "from": self._state.value, "to": state.value}},
        )
        self._state = state
        for listener in list(self._listeners):
            listener(state)

    def _adopt(self, stored: StoredState | None) -> None:
        """Take `stored` as the truth (it came from the store or was just persisted)."""
        self._stored = stored
        if stored is None or (stored.tokens is None and stored.reauth_reason is None):
            self._set_state(TokenState.UNAUTHORISED)
        elif stored.tokens is None or stored.reauth_reason is not None:
            self._set_state(TokenState.REAUTHORIZATION_REQUIRED)
        elif self._inflight is None:
            self._set_state(TokenState.AUTHORISED)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Load the store; with `background`, start the proactive refresh task."""
        await self._store.verify()
        stored = await self._store.load()
        self._last_reread = self._clock()
        self._adopt(stored)
        # Listeners that subscribed before start saw the initial state; make sure a
        # connection that starts unauthorised is announced even if nothing changed.
        if self._state in (TokenState.UNAUTHORISED, TokenState.REAUTHORIZATION_REQUIRED):
            for listener in list(self._listeners):
                listener(self._state)
        if stored is not None and stored.refresh_started_at is not None:
            log.warning("a refresh was in progress when the proxy last stopped")
        self._started = True
        if background:
            self._task = asyncio.create_task(self._background(), name="token-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight is not None and not self._inflight.done():
            # Let a refresh that already reached Pleo persist its answer: the old
            # refresh token is dead the moment Pleo answers.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.shield(self._inflight), self._config.timeouts.token_request + 5
                )

    # -- the CredentialSource ------------------------------------------------------

    async def authorization(self, *, replayable: bool = True) -> Secret:
        self._require_started()
        now = self._clock()
        self._last_used = now
        tokens = await self._usable_tokens()
        margin = refresh_margin(tokens, self._config.refresh.before_expiry)
        # A request that cannot be replayed after a 401 gets a token with room to spare.
        fresh_for = 0.0 if replayable else margin
        if tokens.is_valid(now, for_at_least=fresh_for):
            return bearer(tokens)
        try:
            tokens = await self._refresh(RefreshRequest(fresh_for=fresh_for))
        except TransientOAuthError:
            if not replayable and tokens.is_valid(self._clock()):
                return bearer(tokens)
            raise
        return bearer(tokens)

    async def on_rejected(self, sent: Secret) -> Secret | None:
        self._require_started()
        current = self.tokens
        if current is not None and bearer(current) != sent:
            return bearer(current)  # a newer token is already here: no refresh needed
        tokens = await self._refresh(RefreshRequest(rejected=sent))
        return bearer(tokens)

    async def current_token(self) -> TokenSet:
        """A valid token set (refreshing under the lock if needed): for `pleo-proxy token`."""
        await self.authorization()
        tokens = self.tokens
        if tokens is None:
            raise self._reauth_error()
        return tokens

    async def _usable_tokens(self) -> TokenSet:
        tokens = self.tokens
        if tokens is None:
            await self._reread_if_due()
            tokens = self.tokens
        if tokens is None:
            raise self._reauth_error()
        return tokens

    async def _reread_if_due(self) -> None:
        """Pick up tokens another instance stored (at most once a second)."""
        now = self._clock()
        if now - self._last_reread < REREAD_INTERVAL:
            return
        self._last_reread = now
        try:
            stored = await self._store.load()
        except StoreError as exc:
            log.warning("could not re-read the token store: %s", exc)
            return
        if stored is not None and stored.tokens is not None and stored.reauth_reason is None:
            self._client_rejected = None
            self._adopt(stored)

    def _reauth_error(self) -> ReauthorizationRequired:
        reason = self._stored.reauth_reason if self._stored else None
        if self._state is TokenState.REAUTHORIZATION_REQUIRED:
            detail = f"Pleo access has ended ({reason or 'the grant was revoked'}); authorise again"
        else:
            detail = "the proxy is not connected to Pleo yet; open the authorise page"
        return ReauthorizationRequired(detail, authorize_url=self._page_url)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("token manager not started")

    # -- refresh -------------------------------------------------------------------

    async def _refresh(self, request: RefreshRequest) -> TokenSet:
        """Single-flight: every caller in this process shares one refresh."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._refresh_with_retries(request))
            self._inflight.add_done_callback(self._refresh_done)
            if self.tokens is not None:
                self._set_state(TokenState.REFRESHING)
        # shield: a client that disconnects must not cancel a refresh that Pleo may
        # already have answered; its new tokens still have to be persisted.
        return await asyncio.shield(self._inflight)

    def _refresh_done(self, future: asyncio.Future[TokenSet]) -> None:
        if future is self._inflight:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # mark retrieved: waiters may all have gone
        if self._state is TokenState.REFRESHING:
            self._adopt(self._stored)

    async def _refresh_with_retries(self, request: RefreshRequest) -> TokenSet:
        """The only retry loop for the token endpoint: bounded backoff with jitter."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                tokens = await self._refresh_once(request)
            except (TransientOAuthError, LockTimeout) as exc:
                self._last_transient = exc.detail
                if attempt == MAX_ATTEMPTS - 1:
                    raise TransientOAuthError(
                        f"the Pleo token endpoint is unavailable ({exc.detail})"
                    ) from None
                retry_after = exc.retry_after if isinstance(exc, TransientOAuthError) else None
                await asyncio.sleep(backoff_delay(attempt, retry_after=retry_after))
            else:
                self._last_transient = None
                self._client_rejected = None
                return tokens
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_once(self, request: RefreshRequest) -> TokenSet:
        lock_timeout = self._config.timeouts.token_request + 10
        waiting_since = time.monotonic()
        async with self._store.lock(lock_timeout):
            self._events.lock_waited(time.monotonic() - waiting_since)
            await self._flush_unsaved()
            # Another process may have refreshed (or ended the grant) meanwhile.
            stored = await self._store.load()
            self._last_reread = self._clock()
            tokens, refresh_token = self._refreshable(stored)
            assert stored is not None  # noqa: S101 - _refreshable raised otherwise
            if self._store_makes_refresh_unneeded(tokens, request):
                self._adopt_refreshed_elsewhere(stored)
                return tokens
            return await self._refresh_at_pleo(stored, tokens, refresh_token)

    def _adopt_refreshed_elsewhere(self, stored: StoredState) -> None:
        """Take the store's tokens instead of refreshing; counted when they are new to us."""
        mine = self.tokens
        self._adopt(stored)
        if stored.tokens is not None and (
            mine is None or mine.access_token != stored.tokens.access_token
        ):
            self._events.refreshed("adopted")
            log.info(
                "adopted tokens another process refreshed",
                extra={"fields": {"event": "refresh", "outcome": "adopted"}},
            )

    def _refreshable(self, stored: StoredState | None) -> tuple[TokenSet, Secret]:
        """The stored tokens and refresh token; raises when there is nothing to refresh."""
        if stored is None or stored.tokens is None or stored.reauth_reason is not None:
            self._adopt(stored)
            raise self._reauth_error()
        if stored.tokens.refresh_token is None:
            raise ReauthorizationRequired(
                "no refresh token is stored; authorise again", authorize_url=self._page_url
            )
        return stored.tokens, stored.tokens.refresh_token

    def _store_makes_refresh_unneeded(self, stored: TokenSet, request: RefreshRequest) -> bool:
        """True when the store already holds what this refresh was meant to produce."""
        if request.rejected is not None:
            return bearer(stored) != request.rejected
        mine = self.tokens
        newer = mine is None or mine.access_token != stored.access_token
        if request.force and not newer:
            return False
        return stored.is_valid(self._clock(), for_at_least=request.fresh_for)

    async def _refresh_at_pleo(
        self, stored: StoredState, tokens: TokenSet, refresh_token: Secret
    ) -> TokenSet:
        interrupted = stored.refresh_started_at is not None
        # The mark is durable before Pleo sees the refresh token: a crash from here on
        # is recognised at the next start.
        marked = stored.evolve(refresh_started_at=self._clock())
        await self._store.save(marked)
        try:
            new_tokens = await oauth.refresh_tokens(
                self._session,
                self._config.pleo,
                refresh_token=refresh_token,
                timeout=self._config.timeouts.token_request,
                now=self._clock(),
            )
        except ReauthorizationRequired as exc:
            reason = INTERRUPTED_REASON if interrupted else exc.detail
            self._events.refreshed("invalid_grant")
            await self._end_grant(marked, reason)
            raise self._reauth_error() from None
        except ClientRejected as exc:
            self._client_rejected = exc.detail
            self._events.refreshed("client_rejected")
            log.warning(
                "refresh failed: Pleo rejected the client (%s)",
                exc.detail,
                extra={"fields": {"event": "refresh", "outcome": "client_rejected"}},
            )
            await self._save_outcome(marked, "client_rejected")
            raise
        except OAuthError as exc:
            self._events.refreshed("transient")
            log.warning(
                "refresh failed, will retry: %s",
                exc.detail,
                extra={"fields": {"event": "refresh", "outcome": "transient"}},
            )
            await self._save_outcome(marked, "transient")
            raise
        if not new_tokens.scopes:
            new_tokens = with_scopes(new_tokens, tokens.scopes)
        now = self._clock()
        fresh = marked.evolve(
            tokens=new_tokens,
            refresh_started_at=None,
            last_refresh_at=now,
            last_refresh_outcome="ok",
            refresh_count=marked.refresh_count + 1,
        )
        # Persist before use: the old refresh token died when Pleo answered.
        try:
            await self._store.save(fresh)
        except StoreError:
            # These are now the connection's only live tokens. Keep them, unused, in
            # memory; every later refresh attempt writes them first (`_flush_unsaved`).
            self._unsaved = fresh
            log.error(
                "could not persist the refreshed tokens; kept in memory until a write succeeds",
                extra={"fields": {"event": "refresh", "outcome": "unsaved"}},
            )
            raise
        self._adopt(fresh)
        self._events.refreshed("ok")
        log.info(
            "refreshed the access token (valid for %.0f s)",
            new_tokens.lifetime,
            extra={"fields": {"event": "refresh", "outcome": "ok"}},
        )
        return new_tokens

    async def _flush_unsaved(self) -> None:
        """Write tokens whose save failed after Pleo rotated (call under the lock).

        Until this succeeds nothing is sent to Pleo: the stored refresh token is spent.
        """
        if self._unsaved is None:
            return
        await self._store.save(self._unsaved)
        self._adopt(self._unsaved)
        self._unsaved = None
        log.info("persisted the refreshed tokens that were kept in memory")

    async def _save_outcome(self, marked: StoredState, outcome: str) -> None:
        """Record a failed attempt and clear the in-progress mark."""
        state = marked.evolve(
            refresh_started_at=None, last_refresh_at=self._clock(), last_refresh_outcome=outcome
        )
        await self._store.save(state)
        self._stored = state

    async def _end_grant(self, marked: StoredState, reason: str) -> None:
        """Pleo ended the grant: wipe the tokens, keep why, and ask for consent again."""
        log.warning("Pleo access has ended: %s; re-authorisation is required", reason)
        ended = StoredState(
            subject=marked.subject,
            company_name=marked.company_name,
            last_refresh_at=self._clock(),
            last_refresh_outcome="invalid_grant",
            refresh_count=marked.refresh_count,
            reauth_reason=reason,
            generation=marked.generation + 1,
        )
        await self._store.save(ended)
        self._adopt(ended)

    # -- installing and removing ---------------------------------------------------

    async def install(
        self, tokens: TokenSet, *, subject: str | None = None, company_name: str | None = None
    ) -> None:
        """Persist freshly granted tokens (after the authorise callback) and become authorised."""
        self._require_started()
        async with self._store.lock(self._config.timeouts.token_request + 10):
            previous = await self._store.load()
            state = StoredState(
                tokens=tokens,
                subject=subject,
                company_name=company_name,
                obtained_at=self._clock(),
                generation=(previous.generation + 1) if previous else 1,
            )
            await self._store.save(state)
        self._client_rejected = None
        # Not counted as use: proactive refresh starts once clients send requests.
        self._adopt(state)
        log.info("connected to Pleo (%s)", company_name or subject or "subject unknown")

    async def logout(self) -> None:
        """Delete the local tokens and become unauthorised."""
        async with self._store.lock(self._config.timeouts.token_request + 10):
            await self._store.delete()
        self._adopt(None)

    # -- background refresh ------------------------------------------------------

    def next_refresh_at(self, now: float) -> float | None:
        """When the background task should refresh next, or None while unauthorised."""
        if self._unsaved is not None:
            return now  # retry the write of the only live tokens
        stored = self._stored
        if stored is None or stored.tokens is None or stored.reauth_reason is not None:
            return None
        tokens = stored.tokens
        since = stored.last_refresh_at or stored.obtained_at or now
        due = since + self._config.refresh.keepalive
        # Proactive refresh only for a connection in use within the last token lifetime.
        if now - self._last_used <= tokens.lifetime:
            margin = refresh_margin(tokens, self._config.refresh.before_expiry)
            due = min(due, tokens.expires_at - margin)
        return due

    async def _background(self) -> None:
        while True:
            now = self._clock()
            due = self.next_refresh_at(now)
            if due is None:
                await self._reread_if_due()
                await asyncio.sleep(BACKGROUND_TICK)
                continue
            if due > now:
                await asyncio.sleep(min(due - now, BACKGROUND_TICK))
                continue
            await self._background_refresh()

    async def _background_refresh(self) -> None:
        stored = self._stored
        if stored is None or stored.tokens is None:
            return
        since = stored.last_refresh_at or stored.obtained_at or 0.0
        keepalive_due = self._clock() >= since + self._config.refresh.keepalive
        margin = refresh_margin(stored.tokens, self._config.refresh.before_expiry)
        request = RefreshRequest(fresh_for=margin, force=keepalive_due)
        try:
            await self._refresh(request)
        except OAuthError as exc:
            log.warning("background refresh failed: %s", exc.detail)
            await asyncio.sleep(BACKOFF_CAP)
        except StoreError as exc:
            log.warning("background refresh could not use the token store: %s", exc.detail)
            await asyncio.sleep(BACKOFF_CAP)

    # -- reporting -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status JSON of the contract: never a secret."""
        stored = self._stored or StoredState()
        tokens = stored.tokens
        return {
            "state": self._state.value,
            "expires_at": iso_utc(tokens.expires_at) if tokens else None,
            "scopes": list(tokens.scopes) if tokens else [],
            "subject": stored.subject,
            "company": stored.company_name,
            "last_refresh": {
                "at": iso_utc(stored.last_refresh_at),
                "outcome": stored.last_refresh_outcome,
            },
            "refresh_count": stored.refresh_count,
            "reason": stored.reauth_reason or self._client_rejected or self._last_transient,
            "authorize_url": self._page_url if tokens is None else None,
        }
