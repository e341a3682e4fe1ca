"""A connection's status, without I/O: the state an entry means, refreshing, reporting."""

from __future__ import annotations

import time

from proxy.lifecycle.clocks import Expiry, steady_clock
from proxy.lifecycle.rules import TokenEvents, TokenState
from proxy.lifecycle.status import ConnectionStatus
from proxy.secret import Secret
from proxy.tokenset import StoredState, TokenSet

PAGE = "http://localhost:8080/_proxy/authorize"


class Recorded(TokenEvents):
    def __init__(self) -> None:
        self.changes: list[tuple[TokenState, TokenState, str | None]] = []

    def state_changed(self, previous: TokenState, state: TokenState, reason: str | None) -> None:
        self.changes.append((previous, state, reason))


def a_status(events: TokenEvents | None = None) -> ConnectionStatus:
    expiry = Expiry(wall=time.time, steady=steady_clock)
    return ConnectionStatus("acme", events=events or TokenEvents(), expiry=expiry, page_url=PAGE)


def granted() -> StoredState:
    tokens = TokenSet(Secret("at-value"), Secret("rt-value"), time.time() + 60, lifetime=60)
    return StoredState(tokens=tokens, subject="urn:pleo:company:x")


def test_an_entry_decides_the_state_and_listeners_hear_each_change() -> None:
    events = Recorded()
    status = a_status(events)
    heard: list[TokenState] = []
    status.subscribe(heard.append)
    status.adopt(granted())
    status.adopt(granted())  # the same state again: nobody is told
    ended = StoredState(reauth_reason="revoked")
    status.adopt(ended)
    assert heard == [
        TokenState.UNAUTHORISED,
        TokenState.AUTHORISED,
        TokenState.REAUTHORIZATION_REQUIRED,
    ]
    assert events.changes[-1] == (
        TokenState.AUTHORISED,
        TokenState.REAUTHORIZATION_REQUIRED,
        "revoked",
    )


def test_refreshing_lasts_until_the_refresh_ends() -> None:
    status = a_status()
    status.adopt(granted())
    heard: list[TokenState] = []
    status.subscribe(heard.append)
    status.refresh_started()
    status.adopt(granted())  # new tokens read meanwhile: still refreshing
    status.refresh_ended(last=False)  # an older refresh ended; a newer one is in flight
    assert heard == [TokenState.AUTHORISED, TokenState.REFRESHING]
    status.refresh_ended(last=True)
    assert heard[-1] is TokenState.AUTHORISED


def test_a_refresh_without_tokens_stays_unauthorised() -> None:
    status = a_status()
    status.refresh_started()
    assert status.state is TokenState.UNAUTHORISED


def test_every_adopted_entry_is_announced_to_the_due_hook() -> None:
    status = a_status()
    calls: list[None] = []
    status.on_adopt = lambda: calls.append(None)
    status.adopt(granted())
    status.adopt(None)
    assert len(calls) == 2


def test_reports_say_why_and_show_no_secret() -> None:
    status = a_status()
    assert "not connected to Pleo yet" in status.reauth_error().detail
    status.adopt(granted())
    body = status.body()
    assert body["state"] == "authorised"
    assert body["authorize_url"] is None
    assert "at-value" not in str(body)
    assert "rt-value" not in str(body)
    status.last_transient = "Pleo answered 503"
    assert status.body()["reason"] == "Pleo answered 503"
    status.adopt(StoredState(reauth_reason="the grant was revoked"))
    error = status.reauth_error()
    assert "the grant was revoked" in error.detail
    assert error.authorize_url == PAGE
