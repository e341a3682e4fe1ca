"""One refresh of one connection, across processes: the oauth2-proxy `stored_session` order.

Store lock (bounded) → re-read the store (another process may have refreshed, or ended
the grant) → write what an earlier attempt could not (if the store still holds that
attempt's mark) → still needed? → mark the refresh in the store → one call to Pleo
(within the process-wide `refresh.max_concurrent`) → persist (fsync) → release. Must not
retry (the manager's loop does), keep token state for handing out, or know file formats
and Redis commands.

A mark is a promise: whoever wrote it may have presented the refresh token it covers.
On a store whose lock can lapse while its holder lives (`mark_grace`), nobody else ever
presents that token: another holder's mark is left to it for the grace, then the refresh
is reported interrupted; and a holder whose lease lapsed (FencedOut) writes its result
later, under the lock again, only over its own mark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiohttp

from proxy.config import Config
from proxy.errors import (
    ClientRejected,
    FencedOut,
    LockTimeout,
    OAuthError,
    ReauthorizationRequired,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle import oauth
from proxy.lifecycle.limiter import Priority, TokenLimiter
from proxy.lifecycle.rules import (
    INTERRUPTED_REASON,
    RefreshRequest,
    TokenEvents,
    Wanted,
    bearer,
    same_digest,
    token_digest,
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
class Pending:
    """What an attempt meant to write after calling Pleo, over the mark it had written."""

    state: StoredState
    mark: StoredState

    @property
    def fresh(self) -> bool:
        """New tokens from Pleo: the connection's only live ones, never to be dropped lightly."""
        return self.state.last_refresh_outcome == "ok"


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
        self.pending: Pending | None = None  # a write after Pleo answered that failed
        self.recorded: StoredState | None = None  # the last state written by a failed attempt

    @property
    def unsaved(self) -> StoredState | None:
        """Refreshed tokens not yet in the store (they are written before anything else)."""
        return self.pending.state if self.pending is not None and self.pending.fresh else None

    async def run(
        self,
        request: RefreshRequest,
        mine: TokenSet | None,
        *,
        priority: Priority,
        mine_until: float | None = None,
    ) -> Refreshed:
        """Refresh unless the store already holds what `request` wants (`mine_until`: see
        `Wanted`; `priority`: the call's rank at the limiter, raised if a request joins).
        Raises OAuthError, StoreError (FencedOut, LockTimeout), NothingToRefresh, GrantEnded."""
        wanted = Wanted.of(request, mine, mine_until=mine_until)
        return await self.run_wanted(wanted, priority=priority)

    async def run_wanted(self, wanted: Wanted, *, priority: Priority) -> Refreshed:
        """`run` for a request whose tokens are named by digest (a refresh helper's way)."""
        lock_timeout = self.config.timeouts.token_request + 10
        waiting_since = time.monotonic()
        async with self._store.lock(lock_timeout):
            self._events.lock_waited(time.monotonic() - waiting_since)
            # Another process may have refreshed (or ended the grant) meanwhile.
            stored = await self._store.load()
            flushed = await self.flush_pending(stored)
            if flushed is not None:
                stored = flushed
                mine = token_digest(flushed.tokens.access_token) if flushed.tokens else None
                wanted = replace(wanted, mine=mine, mine_until=None)
            tokens, refresh_token = _refreshable(stored)
            assert stored is not None  # noqa: S101 - _refreshable raised otherwise
            if self._store_makes_refresh_unneeded(tokens, wanted):
                return Refreshed(stored, tokens, by_us=False, flushed=flushed is not None)
            if stored.refresh_started_at is not None:
                await self._leave_mark_to_its_holder(stored)
            return await self._refresh_at_pleo(stored, tokens, refresh_token, priority)

    async def flush_pending(self, stored: StoredState | None) -> StoredState | None:
        """Write what an earlier attempt could not, if `stored` (just read, under the lock)
        is still that attempt's mark; forget it when the store has moved on.

        Until this is settled nothing is sent to Pleo: the marked refresh token is spent.
        """
        pending = self.pending
        if pending is None:
            return None
        if not _may_replace(stored, pending):
            # Written after our mark: newer tokens, a logout, a new consent. Ours lose.
            self.pending = None
            log.warning(
                "discarded the result of an earlier refresh: the store changed since",
                extra={"fields": {"event": "refresh", "outcome": "discarded"}},
            )
            return None
        # Generations only grow: over an interrupted report, ours comes after it.
        after = stored.generation + 1 if stored is not None else 0
        state = replace(pending.state, generation=max(pending.state.generation, after))
        await self._store.save(state)
        self.pending = None
        log.info("persisted the result of an earlier refresh that could not be written")
        return state

    async def _leave_mark_to_its_holder(self, stored: StoredState) -> None:
        """Another holder's mark, found under the lock: is its refresh token ours to present?

        Where locks end with their holder (file), the holder is gone and the token is
        presented (a refusal then reads "a refresh was interrupted"). Where a lock can
        lapse while its holder lives, presenting it could be the second use that ends the
        grant: it is left to its holder (LockTimeout: retry later) for `mark_grace`,
        after which the refresh is reported interrupted (GrantEnded).
        """
        grace = self._store.mark_grace
        started = stored.refresh_started_at
        if grace is None or started is None:
            return
        age = self._clock() - started
        if age < grace:
            raise LockTimeout(
                f"another instance's refresh (started {age:.0f} s ago) has not finished;"
                " its refresh token is not presented twice"
            )
        raise GrantEnded(await self._end_interrupted(stored))

    def _store_makes_refresh_unneeded(self, stored: TokenSet, wanted: Wanted) -> bool:
        """True when the store already holds what this refresh was meant to produce."""
        if wanted.rejected is not None:
            return not same_digest(wanted.rejected, bearer(stored))
        newer = wanted.mine is None or not same_digest(wanted.mine, stored.access_token)
        if wanted.force and not newer:
            return False
        expires_at = stored.expires_at
        if not newer and wanted.mine_until is not None:
            # The store holds the asker's own token: its judgement (its steady clock
            # included) stands. On this wall clock alone, stepped back, an expired token
            # would look fresh and be handed out again.
            expires_at = min(expires_at, wanted.mine_until)
        return self._clock() + wanted.fresh_for < expires_at

    async def _refresh_at_pleo(
        self, stored: StoredState, tokens: TokenSet, refresh_token: Secret, priority: Priority
    ) -> Refreshed:
        interrupted = stored.refresh_started_at is not None
        # The mark is durable before Pleo sees the refresh token: a crash from here on
        # is recognised at the next start.
        marked = stored.evolve(refresh_started_at=self._clock())
        await self._store.save(marked)
        try:
            new_tokens = await self._call_pleo(refresh_token, priority)
        except ReauthorizationRequired as exc:
            self._events.refreshed("invalid_grant")
            reason = INTERRUPTED_REASON if interrupted else exc.detail
            raise GrantEnded(await self._end_grant(marked, reason)) from None
        except ClientRejected as exc:
            await self._failed(
                marked, "client_rejected", f"Pleo rejected the client ({exc.detail})"
            )
            raise
        except OAuthError as exc:
            await self._failed(marked, "transient", f"{exc.detail}; will retry")
            raise
        fresh = self._fresh_state(marked, tokens, new_tokens)
        await self._persist(fresh, marked)
        self._events.refreshed("ok")
        log.info(
            "refreshed the access token (valid for %.0f s)",
            new_tokens.lifetime,
            extra={"fields": {"event": "refresh", "outcome": "ok"}},
        )
        assert fresh.tokens is not None  # noqa: S101 - set just above
        return Refreshed(fresh, fresh.tokens, by_us=True)

    async def _call_pleo(self, refresh_token: Secret, priority: Priority) -> TokenSet:
        if self._limiter is None:
            return await self._present(refresh_token)
        async with self._limiter.slot(priority):
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

    async def _persist(self, fresh: StoredState, marked: StoredState) -> None:
        """Persist before use: the old refresh token died when Pleo answered."""
        try:
            await self._write_over_mark(fresh, marked)
        except StoreError:
            # These are now the connection's only live tokens. Keep them, unused, in
            # memory; every later attempt writes them first (`flush_pending`).
            log.error(
                "could not persist the refreshed tokens; kept in memory until a write succeeds",
                extra={"fields": {"event": "refresh", "outcome": "unsaved"}},
            )
            raise

    async def _write_over_mark(self, state: StoredState, marked: StoredState) -> None:
        """Write what replaces our mark; kept as pending when the store refuses or fails."""
        try:
            await self._store.save(state)
        except StoreError as exc:
            self.pending = Pending(state, marked)
            if isinstance(exc, FencedOut):
                self._events.refreshed("lock_lost")
            raise

    async def _failed(self, marked: StoredState, outcome: str, why: str) -> None:
        """Count, log and record an attempt Pleo did not answer with tokens."""
        self._events.refreshed(outcome)
        log.warning(
            "refresh failed: %s", why, extra={"fields": {"event": "refresh", "outcome": outcome}}
        )
        await self._save_outcome(marked, outcome)

    async def _save_outcome(self, marked: StoredState, outcome: str) -> None:
        """Record a failed attempt and clear the in-progress mark."""
        state = marked.evolve(
            refresh_started_at=None, last_refresh_at=self._clock(), last_refresh_outcome=outcome
        )
        await self._write_over_mark(state, marked)
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
        await self._write_over_mark(ended, marked)
        return ended

    async def _end_interrupted(self, stored: StoredState) -> StoredState:
        """Report another holder's refresh as interrupted (call under the lock).

        The mark's time is kept, so that holder, should it come back with new tokens,
        recognises its own refresh and may still write them (`flush_pending`).
        """
        log.warning(
            "a refresh by another instance was interrupted; re-authorisation is required",
            extra={"fields": {"event": "refresh", "outcome": "interrupted"}},
        )
        self._events.refreshed("interrupted")
        ended = StoredState(
            subject=stored.subject,
            company_name=stored.company_name,
            last_refresh_at=self._clock(),
            last_refresh_outcome="interrupted",
            refresh_count=stored.refresh_count,
            refresh_started_at=stored.refresh_started_at,
            reauth_reason=INTERRUPTED_REASON,
            generation=stored.generation + 1,
        )
        await self._store.save(ended)
        return ended


def _may_replace(stored: StoredState | None, pending: Pending) -> bool:
    """Whether `pending` may be written over `stored`: only over its own mark, or, for new
    tokens, over a report that its refresh was interrupted, or over nothing (a Redis that
    came back empty: the tokens are live, and nobody else has them)."""
    if _is_mark(stored, pending.mark):
        return True
    return pending.fresh and (stored is None or _is_interrupted_mark(stored, pending.mark))


def _is_mark(stored: StoredState | None, mark: StoredState) -> bool:
    """`stored` is `mark` as written: nothing was written over it since."""
    return (
        stored is not None
        and stored.refresh_started_at == mark.refresh_started_at
        and stored.generation == mark.generation
    )


def _is_interrupted_mark(stored: StoredState | None, mark: StoredState) -> bool:
    """`stored` is another holder's report that the refresh `mark` began was interrupted."""
    return (
        stored is not None
        and stored.reauth_reason == INTERRUPTED_REASON
        and stored.tokens is None
        and stored.refresh_started_at == mark.refresh_started_at
        and stored.generation == mark.generation + 1
    )


def _refreshable(stored: StoredState | None) -> tuple[TokenSet, Secret]:
    """The stored tokens and refresh token; raises NothingToRefresh otherwise."""
    if stored is None or stored.tokens is None or stored.reauth_reason is not None:
        raise NothingToRefresh(stored)
    if stored.tokens.refresh_token is None:
        raise NothingToRefresh(None, detail="no refresh token is stored; authorise again")
    return stored.tokens, stored.tokens.refresh_token
