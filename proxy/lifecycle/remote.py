"""A connection's refresh sequence run by the refresh helper (`exchange`, `exchanger`), so
that a refresh Pleo answers is persisted even if this process dies first. When no helper
can start, the sequence runs in this process, as it always did. Must not lock the store,
call Pleo, or know the helper's process and socket.
"""

from __future__ import annotations

from proxy.config import Config
from proxy.errors import TransientOAuthError
from proxy.lifecycle import wire
from proxy.lifecycle.exchange import Exchanger, HelperLost, HelperUnavailable
from proxy.lifecycle.limiter import Priority
from proxy.lifecycle.refresh import Pending, Refreshed, RefreshSequence
from proxy.lifecycle.rules import RefreshRequest, TokenEvents, Wanted
from proxy.tokenset import StoredState, TokenSet


class RemoteSequence:
    """A connection's refresh sequence, run by the helper (here when none can start)."""

    def __init__(
        self,
        local: RefreshSequence,
        exchanger: Exchanger,
        *,
        name: str,
        events: TokenEvents,
    ) -> None:
        self._local = local
        self._exchanger = exchanger
        self._name = name
        self._events = events
        self._kept: Pending | None = None  # what the helper keeps for this connection
        self.recorded: StoredState | None = None

    @property
    def config(self) -> Config:
        return self._local.config

    @config.setter
    def config(self, config: Config) -> None:
        self._local.config = config

    @property
    def pending(self) -> Pending | None:
        """What waits to be written since Pleo answered: in the helper, or here."""
        return self._kept if self._kept is not None else self._local.pending

    @pending.setter
    def pending(self, pending: Pending | None) -> None:
        # Cleared by a logout or a deletion: the helper must drop its copy as well.
        if pending is None:
            self._exchanger.discard(self._name)
        self._kept = None
        self._local.pending = pending

    @property
    def unsaved(self) -> StoredState | None:
        """New tokens not yet in the store (they are written before anything else)."""
        pending = self.pending
        return pending.state if pending is not None and pending.fresh else None

    async def run(
        self,
        request: RefreshRequest,
        mine: TokenSet | None,
        *,
        priority: Priority,
        mine_until: float | None = None,
    ) -> Refreshed:
        """As `RefreshSequence.run`; TransientOAuthError when the helper stopped meanwhile."""
        wanted = Wanted.of(request, mine, mine_until=mine_until)
        token_request = self.config.timeouts.token_request
        try:
            answer = await self._exchanger.refresh(
                self._name, wanted, token_request=token_request, priority=priority
            )
        except HelperUnavailable:
            return await self._run_here(request, mine, priority=priority, mine_until=mine_until)
        except HelperLost as exc:
            # Pleo may have rotated: the next attempt re-reads the store under the lock,
            # and a refused token there ends as "a refresh was interrupted".
            raise TransientOAuthError(str(exc)) from None
        wire.replay(answer.events, self._events)
        self._kept = answer.pending
        self.recorded = answer.recorded
        try:
            return answer.outcome()
        except wire.WireError as exc:
            raise TransientOAuthError(
                f"the refresh helper's answer is unreadable ({exc})"
            ) from None

    async def _run_here(
        self,
        request: RefreshRequest,
        mine: TokenSet | None,
        *,
        priority: Priority,
        mine_until: float | None,
    ) -> Refreshed:
        try:
            return await self._local.run(request, mine, priority=priority, mine_until=mine_until)
        finally:
            self.recorded, self._local.recorded = self._local.recorded, None
