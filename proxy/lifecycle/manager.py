"""The token manager of one connection: its state machine, single-flight and retries.

States: unauthorised → authorised ⇄ refreshing → reauthorization_required.
A refresh is single-flight in the process, then `RefreshSequence` (lock, re-read,
mark, Pleo, persist) under the one retry loop here; then the new tokens are handed out.
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
    FencedOut,
    LockTimeout,
    OAuthError,
    ReauthorizationRequired,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle import entries
from proxy.lifecycle.background import keep_fresh
from proxy.lifecycle.clocks import Clock, Expiry, steady_clock
from proxy.lifecycle.exchange import Exchanger, RemoteSequence
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.refresh import GrantEnded, NothingToRefresh, Refreshed, RefreshSequence
from proxy.lifecycle.rules import (
    BACKGROUND_TICK as BACKGROUND_TICK,
    INTERRUPTED_REASON as INTERRUPTED_REASON,
    MAX_ATTEMPTS as MAX_ATTEMPTS,
    REREAD_INTERVAL as REREAD_INTERVAL,
    Due,
    RefreshRequest as RefreshRequest,
    StateListener as StateListener,
    TokenEvents as TokenEvents,
    TokenState as TokenState,
    backoff_delay as backoff_delay,
    bearer as bearer,
    refresh_due,
    refresh_margin as refresh_margin,
    state_of,
    status_body,
)
from proxy.names import DEFAULT_CONNECTION
from proxy.secret import Secret
from proxy.store import TokenStore
from proxy.tokenset import Link, StoredState, TokenSet
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
        clock: Clock = time.time,
        steady: Clock = steady_clock,
        events: TokenEvents | None = None,
        name: str = DEFAULT_CONNECTION,
        limiter: TokenLimiter | None = None,
        exchanger: Exchanger | None = None,
    ) -> None:
        """`clock`: the wall clock (expiries, stored times); `steady`: how long things last
        here (see `clocks`). `exchanger`: refresh through that helper process (persisted
        even if we die)."""
        self.name = name
        self._config = config
        self._events = events if events is not None else TokenEvents()
        self._store = store
        self._clock = clock
        self._steady = steady
        self._expiry = Expiry(wall=clock, steady=steady)
        here = RefreshSequence(
            config, store, session, clock=clock, events=self._events, limiter=limiter
        )
        self._sequence: RefreshSequence | RemoteSequence = here
        if exchanger is not None:
            self._sequence = RemoteSequence(here, exchanger, name=name, events=self._events)
        self._listeners: list[StateListener] = []
        self._state = TokenState.UNAUTHORISED
        self._stored: StoredState | None = None
        self._inflight: asyncio.Future[TokenSet] | None = None
        self._task: asyncio.Task[None] | None = None
        # Both on the steady clock: a wall clock stepped back must not make a connection
        # look in use for an hour, nor stop the re-reads of the store for as long.
        self._last_used = float("-inf")
        self._last_reread = float("-inf")
        self._client_rejected: str | None = None
        self._last_transient: str | None = None
        self._started = False
        self._on_due: Callable[[TokenManager], None] | None = None
        self.poll_store = True
        self._page_url = authorise_page_url(config, name)

    def use_timeouts(self, timeouts: Timeouts) -> None:
        """Timeouts from a reloaded configuration (token requests and lock waits)."""
        self._config = dataclasses.replace(self._config, timeouts=timeouts)
        self._sequence.config = self._config

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @property
    def page_url(self) -> str:
        """This connection's authorise page, without any code."""
        return self._page_url

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> TokenState:
        return self._state

    @property
    def tokens(self) -> TokenSet | None:
        return self._stored.tokens if self._stored else None

    @property
    def stored(self) -> StoredState | None:
        """What the store last held for this connection (holds secrets: never log it)."""
        return self._stored

    def subscribe(self, listener: StateListener) -> None:
        """Call `listener(state)` on every state change (and once now, with the current state)."""
        self._listeners.append(listener)
        listener(self._state)

    def _set_state(self, state: TokenState) -> None:
        if state is self._state:
            return
        previous = self._state
        fields = {"event": "state", "from": previous.value, "to": state.value}
        log.info(
            "token state: %s → %s",
            previous.value,
            state.value,
            extra={"fields": fields | {"connection": self.name}},
        )
        self._state = state
        reason = self._stored.reauth_reason if self._stored else None
        self._events.state_changed(previous, state, reason)
        for listener in list(self._listeners):
            listener(state)

    def _adopt(self, stored: StoredState | None) -> None:
        """Take `stored` as the truth (it came from the store or was just persisted)."""
        self._stored = stored
        self._expiry.track(stored.tokens if stored is not None else None)
        state = state_of(stored)
        if state is not TokenState.AUTHORISED or self._inflight is None:
            self._set_state(state)
        if self._on_due is not None:
            self._on_due(self)

    def on_due(self, hook: Callable[[TokenManager], None]) -> None:
        """Call `hook(self)` whenever the next refresh's due time may have changed."""
        self._on_due = hook
        hook(self)

    @property
    def busy(self) -> bool:
        """A refresh is in flight, or refreshed tokens still wait to be written."""
        return self._inflight is not None or self._sequence.unsaved is not None

    # -- lifecycle -----------------------------------------------------------------

    async def start(
        self, *, background: bool = True, verify: bool = True, poll_store: bool = True
    ) -> None:
        """Load the store; with `background`, start the proactive refresh task.

        `verify` checks the store first (once per store, not per connection of one);
        `poll_store` lets the idle background task re-read it each second (a registry
        that watches the store's change marker turns it off).
        """
        if verify:
            await self._store.verify()
        self.poll_store = poll_store
        stored = await self._store.load()
        self._last_reread = self._steady()
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
            self._task = asyncio.create_task(keep_fresh(self), name="token-refresh")

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
        idle = self._idle()
        self._last_used = self._steady()
        if idle and self._on_due is not None:
            self._on_due(self)  # proactive refresh applies again
        tokens = await self._usable_tokens()
        margin = refresh_margin(tokens, self._config.refresh.before_expiry)
        # A request that cannot be replayed after a 401 gets a token with room to spare.
        fresh_for = 0.0 if replayable else margin
        if self._expiry.is_valid(tokens, now, for_at_least=fresh_for):
            return bearer(tokens)
        try:
            tokens = await self._refresh(RefreshRequest(fresh_for=fresh_for))
        except TransientOAuthError:
            if not replayable and self._expiry.is_valid(tokens, self._clock()):
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
            await self.reread_if_due()
            tokens = self.tokens
        if tokens is None:
            raise self._reauth_error()
        return tokens

    async def reread_if_due(self) -> None:
        """Pick up tokens another instance stored (at most once a second)."""
        if self._steady() - self._last_reread < REREAD_INTERVAL:
            return
        await self.reread()

    async def reread(self) -> None:
        """Re-read the store now and take usable tokens found there (another process's)."""
        self._last_reread = self._steady()
        try:
            stored = await self._store.load()
        except StoreError as exc:
            log.warning("could not re-read the token store: %s", exc)
            return
        if stored is not None and stored.tokens is not None and stored.reauth_reason is None:
            self._client_rejected = None
            self._adopt(stored)

    def _idle(self) -> bool:
        tokens = self.tokens
        return tokens is None or self._steady() - self._last_used > tokens.lifetime

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
            except (TransientOAuthError, LockTimeout, FencedOut) as exc:
                # FencedOut: this attempt's lease lapsed; the next one re-reads the store.
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
        try:
            result = await self._sequence.run(request, self.tokens, mine_until=self._mine_until())
        except NothingToRefresh as exc:
            if exc.detail is not None:
                raise ReauthorizationRequired(exc.detail, authorize_url=self._page_url) from None
            self._adopt(exc.stored)
            raise self._reauth_error() from None
        except GrantEnded as ended:
            self._adopt(ended.stored)
            raise self._reauth_error() from None
        except ClientRejected as exc:
            self._client_rejected = exc.detail
            self._take_recorded()
            raise
        except OAuthError:
            self._take_recorded()
            raise
        finally:
            self._last_reread = self._steady()
        self._take_result(result)
        return result.tokens

    def _mine_until(self) -> float | None:
        """Until when our tokens are valid by our own judgement, steady clock included."""
        tokens = self.tokens
        return None if tokens is None else self._expiry.expires_at(tokens, self._clock())

    def _take_recorded(self) -> None:
        """A failed attempt was recorded in the store: know it, without a state change."""
        if self._sequence.recorded is not None:
            self._stored, self._sequence.recorded = self._sequence.recorded, None

    def _take_result(self, result: Refreshed) -> None:
        if result.by_us or result.flushed:
            self._adopt(result.stored)
        else:
            self._adopt_refreshed_elsewhere(result.stored)

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

    # -- installing and removing ---------------------------------------------------

    @property
    def _lock_timeout(self) -> float:
        return self._config.timeouts.token_request + 10

    async def install(
        self,
        tokens: TokenSet,
        *,
        subject: str | None = None,
        company_name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Persist freshly granted tokens (after the authorise callback) and become authorised."""
        self._require_started()
        state = await entries.write_grant(
            self._store,
            tokens,
            lock_timeout=self._lock_timeout,
            now=self._clock(),
            subject=subject,
            company_name=company_name,
            extra=extra,
        )
        self._client_rejected = None
        # Not counted as use: proactive refresh starts once clients send requests.
        self._adopt(state)
        log.info("connected to Pleo (%s)", company_name or subject or "subject unknown")

    async def logout(self, *, keep_entry: bool = False) -> None:
        """Delete the local tokens and become unauthorised.

        `keep_entry` leaves an empty entry, so a connection that exists only in the
        store (created at run time) is still known afterwards.
        """
        if keep_entry:
            emptied = await entries.write_empty(self._store, lock_timeout=self._lock_timeout)
        else:
            await entries.delete_entry(self._store, lock_timeout=self._lock_timeout)
            emptied = None
        self._sequence.pending = None  # a refresh result never outlives a logout
        self._adopt(emptied)

    async def save_link(self, link: Link) -> None:
        """Store a new connect link (replacing any earlier one); tokens stay as they are."""
        self._adopt(await entries.write_link(self._store, link, lock_timeout=self._lock_timeout))

    async def forget(self) -> None:
        """Delete the entry under this connection's lock (no refresh is half done then)."""
        await entries.delete_entry(self._store, lock_timeout=self._lock_timeout)
        self._sequence.pending = None
        self._adopt(None)

    async def reload(self) -> None:
        """Take whatever the store holds now, an empty or ended entry included."""
        self._last_reread = self._steady()
        self._adopt(await self._store.load())

    async def stored_link(self) -> Link | None:
        """The connect link as the store holds it now (another process may have made it)."""
        stored = await self._store.load()
        return stored.link if stored is not None else None

    # -- background refresh ------------------------------------------------------

    def next_refresh_at(self, now: float, *, jitter: bool = False) -> float | None:
        """When the background task should refresh next, or None while unauthorised."""
        due = self.next_refresh(now, jitter=jitter)
        return None if due is None else due.at

    def next_refresh(self, now: float, *, jitter: bool = False) -> Due | None:
        if self._sequence.pending is not None:
            # Retry the write (of the only live tokens, or of what clears our mark).
            return Due(now, keepalive=False)
        tokens = self.tokens
        return refresh_due(
            self._stored,
            self._config.refresh,
            now=now,
            # The steady time of the last use, as a reading of the clock `now` comes from.
            last_used=now - (self._steady() - self._last_used),
            jitter=jitter,
            expires_at=self._expiry.expires_at(tokens, now) if tokens is not None else None,
        )

    async def refresh_in_background(self, *, jitter: bool = False) -> bool:
        """The due proactive or keep-alive refresh; False (logged) when it failed."""
        stored = self._stored
        now = self._clock()
        due = self.next_refresh(now, jitter=jitter)
        if due is None:
            return True
        if stored is not None and stored.tokens is not None:
            margin = refresh_margin(stored.tokens, self._config.refresh.before_expiry)
            # Due early by jitter: fresh enough to skip only if it outlives the due time.
            fresh_for = max(margin, self._expiry.expires_at(stored.tokens, now) - due.at)
            request = RefreshRequest(fresh_for=fresh_for, force=due.keepalive, urgent=False)
        elif self._sequence.pending is not None:
            # Kept tokens whose entry was reported interrupted meanwhile: write them back.
            request = RefreshRequest(urgent=False)
        else:
            return True
        try:
            await self._refresh(request)
        except OAuthError as exc:
            log.warning("background refresh failed: %s", exc.detail)
            return False
        except StoreError as exc:
            log.warning("background refresh could not use the token store: %s", exc.detail)
            return False
        return True

    # -- reporting -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status JSON of the contract: never a secret."""
        return status_body(
            self._stored,
            self._state,
            reason=self._client_rejected or self._last_transient,
            page_url=self._page_url,
        )
