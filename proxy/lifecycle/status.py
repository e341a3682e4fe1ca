"""One connection's status as this process knows it: the entry last read or written, the
state that entry means (authorised ⇄ refreshing moved on word from the refresh), the
listeners told of each change, and how it is reported (status JSON, the consent error).
Must not read or write the store, call Pleo, or decide when to refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proxy.errors import ReauthorizationRequired
from proxy.lifecycle.clocks import Expiry
from proxy.lifecycle.rules import StateListener, TokenEvents, TokenState, state_of, status_body
from proxy.tokenset import StoredState, TokenSet

log = logging.getLogger("proxy.tokens")


class ConnectionStatus:
    """The entry and state of one connection; `adopt()` is how a new entry becomes known."""

    def __init__(self, name: str, *, events: TokenEvents, expiry: Expiry, page_url: str) -> None:
        self.name = name
        self.expiry = expiry  # the steady deadline of the tokens held (see `clocks`)
        self.page_url = page_url  # the authorise page, without any code
        # What the store last held (holds secrets: never log it). Set directly to know a
        # failed attempt's record without a state change; `adopt` otherwise.
        self.stored: StoredState | None = None
        # Why the last attempts failed, for the status JSON, until a refresh succeeds.
        self.client_rejected: str | None = None
        self.last_transient: str | None = None
        self.on_adopt: Callable[[], None] | None = None  # the due time may have changed
        self._events = events
        self._state = TokenState.UNAUTHORISED
        self._listeners: list[StateListener] = []
        self._refreshing = False

    @property
    def state(self) -> TokenState:
        return self._state

    @property
    def tokens(self) -> TokenSet | None:
        return self.stored.tokens if self.stored else None

    def subscribe(self, listener: StateListener) -> None:
        """Call `listener(state)` on every state change (and once now, with the current state)."""
        self._listeners.append(listener)
        listener(self._state)

    def announce(self) -> None:
        """Tell every listener the current state again, changed or not."""
        for listener in list(self._listeners):
            listener(self._state)

    def adopt(self, stored: StoredState | None) -> None:
        """Take `stored` as the truth (it came from the store or was just persisted)."""
        self.stored = stored
        self.expiry.track(stored.tokens if stored is not None else None)
        state = state_of(stored)
        # Tokens read while a refresh is in flight leave it refreshing until it ends.
        if state is not TokenState.AUTHORISED or not self._refreshing:
            self._set_state(state)
        if self.on_adopt is not None:
            self.on_adopt()

    def refresh_started(self) -> None:
        """A refresh is in flight: authorised → refreshing (unauthorised stays so)."""
        self._refreshing = True
        if self.tokens is not None:
            self._set_state(TokenState.REFRESHING)

    def refresh_ended(self, *, last: bool) -> None:
        """A refresh ended; `last`: no newer one started meanwhile (the state then settles)."""
        if last:
            self._refreshing = False
        if self._state is TokenState.REFRESHING:
            self.adopt(self.stored)

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
        reason = self.stored.reauth_reason if self.stored else None
        self._events.state_changed(previous, state, reason)
        for listener in list(self._listeners):
            listener(state)

    def reauth_error(self) -> ReauthorizationRequired:
        """What a request gets while there is no grant: why, and where to authorise."""
        reason = self.stored.reauth_reason if self.stored else None
        if self._state is TokenState.REAUTHORIZATION_REQUIRED:
            detail = f"Pleo access has ended ({reason or 'the grant was revoked'}); authorise again"
        else:
            detail = "the proxy is not connected to Pleo yet; open the authorise page"
        return ReauthorizationRequired(detail, authorize_url=self.page_url)

    def body(self) -> dict[str, Any]:
        """The status JSON of the contract: never a secret."""
        return status_body(
            self.stored,
            self._state,
            reason=self.client_rejected or self.last_transient,
            page_url=self.page_url,
        )
