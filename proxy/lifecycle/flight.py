"""One connection's refresh in this process: single-flight, under the one retry loop.

Every caller shares one future; each attempt is one `RefreshSequence` (lock, re-read,
mark, Pleo, persist), and what it ends with is taken into the connection's status. A
request that joins a background refresh raises its priority at the limiter to its own.
Must not decide when to refresh, hand out tokens, or know file formats and Redis commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from proxy.errors import (
    ClientRejected,
    FencedOut,
    LockTimeout,
    OAuthError,
    ReauthorizationRequired,
    TransientOAuthError,
)
from proxy.lifecycle.clocks import Clock
from proxy.lifecycle.limiter import Priority
from proxy.lifecycle.refresh import GrantEnded, NothingToRefresh, Refreshed, RefreshSequence
from proxy.lifecycle.remote import RemoteSequence
from proxy.lifecycle.rules import MAX_ATTEMPTS, RefreshRequest, TokenEvents, backoff_delay
from proxy.lifecycle.status import ConnectionStatus
from proxy.tokenset import StoredState, TokenSet

log = logging.getLogger("proxy.tokens")


class Refresher:
    """The refresh of one connection: `await refresher.refresh(request)` from anywhere."""

    def __init__(
        self,
        status: ConnectionStatus,
        sequence: RefreshSequence | RemoteSequence,
        *,
        clock: Clock,
        events: TokenEvents,
        on_store_read: Callable[[], None],
    ) -> None:
        """`clock`: the wall clock; `on_store_read`: told after each attempt, which read
        the store under its lock (a re-read poll need not read it again so soon)."""
        self._status = status
        self._sequence = sequence
        self._clock = clock
        self._events = events
        self._on_store_read = on_store_read
        self._inflight: asyncio.Future[TokenSet] | None = None
        self._priority = Priority(urgent=True)  # the refresh in flight's, at the limiter

    @property
    def busy(self) -> bool:
        """A refresh is in flight, or refreshed tokens still wait to be written."""
        return self._inflight is not None or self._sequence.unsaved is not None

    async def settle(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (up to `timeout`) for a refresh in flight to end, whatever its outcome."""
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._inflight), timeout)

    async def refresh(self, request: RefreshRequest) -> TokenSet:
        """Single-flight: every caller in this process shares one refresh."""
        if self._inflight is None or self._inflight.done():
            self._priority = Priority(urgent=request.urgent)
            flight = self._refresh_with_retries(request, self._priority)
            self._inflight = asyncio.ensure_future(flight)
            self._inflight.add_done_callback(self._refresh_done)
            self._status.refresh_started()
        elif request.urgent:
            # Joining a background refresh: waiting as one, behind every other connection's
            # background refresh queued at the limiter, could take minutes in a storm.
            self._priority.promote()
        # shield: a client that disconnects must not cancel a refresh that Pleo may
        # already have answered; its new tokens still have to be persisted.
        return await asyncio.shield(self._inflight)

    def _refresh_done(self, future: asyncio.Future[TokenSet]) -> None:
        last = future is self._inflight
        if last:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # mark retrieved: waiters may all have gone
        self._status.refresh_ended(last=last)

    async def _refresh_with_retries(self, request: RefreshRequest, priority: Priority) -> TokenSet:
        """The only retry loop for the token endpoint: bounded backoff with jitter."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                tokens = await self._refresh_once(request, priority)
            except (TransientOAuthError, LockTimeout, FencedOut) as exc:
                # FencedOut: this attempt's lease lapsed; the next one re-reads the store.
                self._status.last_transient = exc.detail
                if attempt == MAX_ATTEMPTS - 1:
                    raise TransientOAuthError(
                        f"the Pleo token endpoint is unavailable ({exc.detail})"
                    ) from None
                retry_after = exc.retry_after if isinstance(exc, TransientOAuthError) else None
                await asyncio.sleep(backoff_delay(attempt, retry_after=retry_after))
            else:
                self._status.last_transient = None
                self._status.client_rejected = None
                return tokens
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_once(self, request: RefreshRequest, priority: Priority) -> TokenSet:
        status = self._status
        try:
            mine_until = self._mine_until()
            result = await self._sequence.run(
                request, status.tokens, priority=priority, mine_until=mine_until
            )
        except NothingToRefresh as exc:
            if exc.detail is not None:
                raise ReauthorizationRequired(exc.detail, authorize_url=status.page_url) from None
            status.adopt(exc.stored)
            raise status.reauth_error() from None
        except GrantEnded as ended:
            status.adopt(ended.stored)
            raise status.reauth_error() from None
        except ClientRejected as exc:
            status.client_rejected = exc.detail
            self._take_recorded()
            raise
        except OAuthError:
            self._take_recorded()
            raise
        finally:
            self._on_store_read()
        self._take_result(result)
        return result.tokens

    def _mine_until(self) -> float | None:
        """Until when our tokens are valid by our own judgement, steady clock included."""
        tokens = self._status.tokens
        return None if tokens is None else self._status.expiry.expires_at(tokens, self._clock())

    def _take_recorded(self) -> None:
        """A failed attempt was recorded in the store: know it, without a state change."""
        if self._sequence.recorded is not None:
            self._status.stored, self._sequence.recorded = self._sequence.recorded, None

    def _take_result(self, result: Refreshed) -> None:
        if result.by_us or result.flushed:
            self._status.adopt(result.stored)
        else:
            self._adopt_refreshed_elsewhere(result.stored)

    def _adopt_refreshed_elsewhere(self, stored: StoredState) -> None:
        """Take the store's tokens instead of refreshing; counted when they are new to us."""
        mine = self._status.tokens
        self._status.adopt(stored)
        if stored.tokens is not None and (
            mine is None or mine.access_token != stored.tokens.access_token
        ):
            self._events.refreshed("adopted")
            log.info(
                "adopted tokens another process refreshed",
                extra={"fields": {"event": "refresh", "outcome": "adopted"}},
            )
