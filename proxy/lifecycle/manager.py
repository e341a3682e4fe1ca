"""The token manager of one connection: hands out its tokens and decides when to refresh.

A request's token is checked, on a 401 compare-and-refreshed, and refreshed in the
background when due; the refresh itself is single-flight under the one retry loop
(`flight`), the state and its reporting are `status`'s, and writes outside a refresh
(a grant, a link, a logout) are `entries`'. Must not know file formats, Redis commands
or aiohttp server objects.
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
from proxy.errors import OAuthError, StoreError, TransientOAuthError
from proxy.lifecycle import entries
from proxy.lifecycle.background import keep_fresh
from proxy.lifecycle.clocks import Clock, Expiry, steady_clock
from proxy.lifecycle.exchange import Exchanger
from proxy.lifecycle.flight import Refresher
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.refresh import RefreshSequence
from proxy.lifecycle.remote import RemoteSequence
from proxy.lifecycle.rules import (
    INTERRUPTED_REASON as INTERRUPTED_REASON,
    REREAD_INTERVAL,
    Due,
    RefreshRequest,
    StateListener,
    TokenEvents as TokenEvents,
    TokenState as TokenState,
    bearer as bearer,
    refresh_due,
    refresh_margin,
)
from proxy.lifecycle.status import ConnectionStatus
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
        events = events if events is not None else TokenEvents()
        self._store = store
        self._clock = clock
        self._steady = steady
        self._expiry = Expiry(wall=clock, steady=steady)
        here = RefreshSequence(config, store, session, clock=clock, events=events, limiter=limiter)
        self._sequence: RefreshSequence | RemoteSequence = here
        if exchanger is not None:
            self._sequence = RemoteSequence(here, exchanger, name=name, events=events)
        self._status = ConnectionStatus(
            name, events=events, expiry=self._expiry, page_url=authorise_page_url(config, name)
        )
        self._refresher = Refresher(
            self._status, self._sequence, clock=clock, events=events, on_store_read=self._read
        )
        self._task: asyncio.Task[None] | None = None
        # Both on the steady clock: a wall clock stepped back must not make a connection
        # look in use for an hour, nor stop the re-reads of the store for as long.
        self._last_used = float("-inf")
        self._last_reread = float("-inf")
        self._started = False
        self._on_due: Callable[[TokenManager], None] | None = None
        self.poll_store = True

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
        return self._status.page_url

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> TokenState:
        return self._status.state

    @property
    def tokens(self) -> TokenSet | None:
        return self._status.tokens

    @property
    def stored(self) -> StoredState | None:
        """What the store last held for this connection (holds secrets: never log it)."""
        return self._status.stored

    def subscribe(self, listener: StateListener) -> None:
        """Call `listener(state)` on every state change (and once now, with the current state)."""
        self._status.subscribe(listener)

    def on_due(self, hook: Callable[[TokenManager], None]) -> None:
        """Call `hook(self)` whenever the next refresh's due time may have changed."""
        self._on_due = hook
        self._status.on_adopt = lambda: hook(self)
        hook(self)

    @property
    def busy(self) -> bool:
        """A refresh is in flight, or refreshed tokens still wait to be written."""
        return self._refresher.busy

    def status(self) -> dict[str, Any]:
        """The status JSON of the contract: never a secret."""
        return self._status.body()

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
        self._read()
        self._status.adopt(stored)
        # Listeners that subscribed before start saw the initial state; make sure a
        # connection that starts unauthorised is announced even if nothing changed.
        if self.state in (TokenState.UNAUTHORISED, TokenState.REAUTHORIZATION_REQUIRED):
            self._status.announce()
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
        # Let a refresh that already reached Pleo persist its answer: the old refresh
        # token is dead the moment Pleo answers.
        await self._refresher.settle(self._config.timeouts.token_request + 5)

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
            tokens = await self._refresher.refresh(RefreshRequest(fresh_for=fresh_for))
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
        tokens = await self._refresher.refresh(RefreshRequest(rejected=sent))
        return bearer(tokens)

    async def stored_since(self, sent: Secret) -> Secret | None:
        """Tokens another process stored after `sent`: the store read now, never a refresh.

        Pleo invalidates every earlier token the moment a grant is refreshed, so with
        several processes sharing a grant a replay can meet a rotation made while it was
        on its way; the token that rotation stored is then worth one more send.
        """
        self._require_started()
        await self.reread()
        current = self.tokens
        if current is None or bearer(current) == sent:
            return None
        if not self._expiry.is_valid(current, self._clock()):
            return None
        return bearer(current)

    async def current_token(self) -> TokenSet:
        """A valid token set (refreshing under the lock if needed): for `pleo-proxy token`."""
        await self.authorization()
        tokens = self.tokens
        if tokens is None:
            raise self._status.reauth_error()
        return tokens

    async def _usable_tokens(self) -> TokenSet:
        tokens = self.tokens
        if tokens is None:
            await self.reread_if_due()
            tokens = self.tokens
        if tokens is None:
            raise self._status.reauth_error()
        return tokens

    def _idle(self) -> bool:
        tokens = self.tokens
        return tokens is None or self._steady() - self._last_used > tokens.lifetime

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("token manager not started")

    # -- re-reading the store --------------------------------------------------------

    def _read(self) -> None:
        """The store was just read (here, or under the lock by a refresh attempt)."""
        self._last_reread = self._steady()

    async def reread_if_due(self) -> None:
        """Pick up tokens another instance stored (at most once a second)."""
        if self._steady() - self._last_reread < REREAD_INTERVAL:
            return
        await self.reread()

    async def reread(self) -> None:
        """Re-read the store now and take usable tokens found there (another process's)."""
        self._read()
        try:
            stored = await self._store.load()
        except StoreError as exc:
            log.warning("could not re-read the token store: %s", exc)
            return
        if stored is not None and stored.tokens is not None and stored.reauth_reason is None:
            self._status.client_rejected = None
            self._status.adopt(stored)

    async def reload(self) -> None:
        """Take whatever the store holds now, an empty or ended entry included."""
        self._read()
        self._status.adopt(await self._store.load())

    async def stored_link(self) -> Link | None:
        """The connect link as the store holds it now (another process may have made it)."""
        stored = await self._store.load()
        return stored.link if stored is not None else None

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
        self._status.client_rejected = None
        # Not counted as use: proactive refresh starts once clients send requests.
        self._status.adopt(state)
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
        self._status.adopt(emptied)

    async def save_link(self, link: Link) -> None:
        """Store a new connect link (replacing any earlier one); tokens stay as they are."""
        stored = await entries.write_link(self._store, link, lock_timeout=self._lock_timeout)
        self._status.adopt(stored)

    async def forget(self) -> None:
        """Delete the entry under this connection's lock (no refresh is half done then)."""
        await entries.delete_entry(self._store, lock_timeout=self._lock_timeout)
        self._sequence.pending = None
        self._status.adopt(None)

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
            self.stored,
            self._config.refresh,
            now=now,
            # The steady time of the last use, as a reading of the clock `now` comes from.
            last_used=now - (self._steady() - self._last_used),
            jitter=jitter,
            expires_at=self._expiry.expires_at(tokens, now) if tokens is not None else None,
        )

    async def refresh_in_background(self, *, jitter: bool = False) -> bool:
        """The due proactive or keep-alive refresh; False (logged) when it failed."""
        stored = self.stored
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
            await self._refresher.refresh(request)
        except OAuthError as exc:
            log.warning("background refresh failed: %s", exc.detail)
            return False
        except StoreError as exc:
            log.warning("background refresh could not use the token store: %s", exc.detail)
            return False
        return True
