"""One refresh of one connection, across processes: the oauth2-proxy `stored_session` order.

Store lock (bounded) → write any tokens whose save failed → re-read the store (another
process may have refreshed, or ended the grant) → still needed? → mark the refresh in
the store → one call to Pleo (within the process-wide `refresh.max_concurrent`) →
persist (fsync) → release. Must not retry (the manager's loop does), keep token state
for handing out, or know file formats and Redis commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.config import Config
from proxy.errors import (
    ClientRejected,
    OAuthError,
    ReauthorizationRequired,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle import oauth
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.rules import (
    INTERRUPTED_REASON,
    RefreshRequest,
    TokenEvents,
    bearer,
    with_scopes,
)
from proxy.secret import Secret
from proxy.store import TokenStore
from proxy.tokenset import StoredState, TokenSet

log = logging.getLogger("proxy.tokens")

# How long every connection waits after Pleo's 429/5xx when it gives no Retry-After.
BUSY_PAUSE = 1.0


class NothingToRefresh(Exception):
    """The store holds no refreshable grant (never authorised, ended, or no refresh token)."""

    def __init__(self, stored: StoredState | None, *, detail: str | None = None) -> None:
        super().__init__("nothing to refresh")
        self.stored = stored
        self.detail = detail


class GrantEnded(Exception):
    """Pleo refused the refresh token: the grant is over; `stored` records why."""

    def __init__(self, stored: StoredState) -> None:
        super().__init__("the grant ended")
        self.stored = stored


@dataclass(frozen=True)
class Refreshed:
    """What the store holds after the sequence; `by_us` when this process called Pleo."""

    stored: StoredState
    tokens: TokenSet
    by_us: bool
    flushed: bool = False  # tokens kept in memory after a failed write are now stored


class RefreshSequence:
    """Runs the sequence for one connection; holds the tokens a failed write left behind."""

    def __init__(
        self,
        config: Config,
        store: TokenStore,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float],
        events: TokenEvents,
        limiter: TokenLimiter | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._session = session
        self._clock = clock
        self._events = events
        self._limiter = limiter
        self.unsaved: StoredState | None = None  # refreshed tokens whose write failed
        self.recorded: StoredState | None = None  # the last state written by a failed attempt

    async def run(self, request: RefreshRequest, mine: TokenSet | None) -> Refreshed:
        """Refresh unless the store already holds what `request` wants. Raises OAuthError,
        StoreError, LockTimeout, NothingToRefresh or GrantEnded."""
        lock_timeout = self.config.timeouts.token_request + 10
        waiting_since = time.monotonic()
        async with self._store.lock(lock_timeout):
            self._events.lock_waited(time.monotonic() - waiting_since)
            flushed = await self.flush_unsaved()
            if flushed is not None:
                mine = flushed.tokens
            # Another process may have refreshed (or ended the grant) meanwhile.
            stored = await self._store.load()
            tokens, refresh_token = _refreshable(stored)
            assert stored is not None  # noqa: S101 - _refreshable raised otherwise
            if self._store_makes_refresh_unneeded(tokens, request, mine):
                return Refreshed(stored, tokens, by_us=False, flushed=flushed is not None)
            return await self._refresh_at_pleo(stored, tokens, refresh_token, request.urgent)

    async def flush_unsaved(self) -> StoredState | None:
        """Write tokens whose save failed after Pleo rotated (call under the lock).

        Until this succeeds nothing is sent to Pleo: the stored refresh token is spent.
        """
        if self.unsaved is None:
            return None
        written = self.unsaved
        await self._store.save(written)
        self.unsaved = None
        log.info("persisted the refreshed tokens that were kept in memory")
        return written

    def _store_makes_refresh_unneeded(
        self, stored: TokenSet, request: RefreshRequest, mine: TokenSet | None
    ) -> bool:
        """True when the store already holds what this refresh was meant to produce."""
        if request.rejected is not None:
            return bearer(stored) != request.rejected
        newer = mine is None or mine.access_token != stored.access_token
        if request.force and not newer:
            return False
        return stored.is_valid(self._clock(), for_at_least=request.fresh_for)

    async def _refresh_at_pleo(
        self, stored: StoredState, tokens: TokenSet, refresh_token: Secret, urgent: bool
    ) -> Refreshed:
        interrupted = stored.refresh_started_at is not None
        # The mark is durable before Pleo sees the refresh token: a crash from here on
        # is recognised at the next start.
        marked = stored.evolve(refresh_started_at=self._clock())
        await self._store.save(marked)
        try:
            new_tokens = await self._call_pleo(refresh_token, urgent=urgent)
        except ReauthorizationRequired as exc:
            self._events.refreshed("invalid_grant")
            reason = INTERRUPTED_REASON if interrupted else exc.detail
            raise GrantEnded(await self._end_grant(marked, reason)) from None
        except ClientRejected as exc:
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
        fresh = self._fresh_state(marked, tokens, new_tokens)
        await self._persist(fresh)
        self._events.refreshed("ok")
        log.info(
            "refreshed the access token (valid for %.0f s)",
            new_tokens.lifetime,
            extra={"fields": {"event": "refresh", "outcome": "ok"}},
        )
        assert fresh.tokens is not None  # noqa: S101 - set just above
        return Refreshed(fresh, fresh.tokens, by_us=True)

    async def _call_pleo(self, refresh_token: Secret, *, urgent: bool) -> TokenSet:
        if self._limiter is None:
            return await self._present(refresh_token)
        async with self._limiter.slot(urgent=urgent):
            try:
                return await self._present(refresh_token)
            except TransientOAuthError as exc:
                if exc.busy:
                    self._limiter.back_off(exc.retry_after or BUSY_PAUSE)
                raise

    async def _present(self, refresh_token: Secret) -> TokenSet:
        return await oauth.refresh_tokens(
            self._session,
            self.config.pleo,
            refresh_token=refresh_token,
            timeout=self.config.timeouts.token_request,
            now=self._clock(),
        )

    def _fresh_state(self, marked: StoredState, old: TokenSet, new: TokenSet) -> StoredState:
        if not new.scopes:
            new = with_scopes(new, old.scopes)
        return marked.evolve(
            tokens=new,
            refresh_started_at=None,
            last_refresh_at=self._clock(),
            last_refresh_outcome="ok",
            refresh_count=marked.refresh_count + 1,
        )

    async def _persist(self, fresh: StoredState) -> None:
        """Persist before use: the old refresh token died when Pleo answered."""
        try:
            await self._store.save(fresh)
        except StoreError:
            # These are now the connection's only live tokens. Keep them, unused, in
            # memory; every later refresh attempt writes them first (`flush_unsaved`).
            self.unsaved = fresh
            log.error(
                "could not persist the refreshed tokens; kept in memory until a write succeeds",
                extra={"fields": {"event": "refresh", "outcome": "unsaved"}},
            )
            raise

    async def _save_outcome(self, marked: StoredState, outcome: str) -> None:
        """Record a failed attempt and clear the in-progress mark."""
        state = marked.evolve(
            refresh_started_at=None, last_refresh_at=self._clock(), last_refresh_outcome=outcome
        )
        await self._store.save(state)
        self.recorded = state

    async def _end_grant(self, marked: StoredState, reason: str) -> StoredState:
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
        return ended


def _refreshable(stored: StoredState | None) -> tuple[TokenSet, Secret]:
    """The stored tokens and refresh token; raises NothingToRefresh otherwise."""
    if stored is None or stored.tokens is None or stored.reauth_reason is not None:
        raise NothingToRefresh(stored)
    if stored.tokens.refresh_token is None:
        raise NothingToRefresh(None, detail="no refresh token is stored; authorise again")
    return stored.tokens, stored.tokens.refresh_token
