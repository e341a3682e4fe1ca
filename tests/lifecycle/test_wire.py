"""The proxy ↔ refresh helper protocol: frames, settings, requests, answers (no processes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, Pleo, Refresh, Timeouts, TokensConfig
from proxy.errors import (
    ClientRejected,
    FencedOut,
    LockTimeout,
    OAuthError,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle import wire
from proxy.lifecycle.refresh import GrantEnded, NothingToRefresh, Pending, Refreshed
from proxy.lifecycle.rules import RefreshRequest, TokenEvents, Wanted, bearer, token_digest
from proxy.secret import Secret
from proxy.tokenset import StoredState, TokenSet

TOKENS = TokenSet(Secret("at-1"), Secret("rt-1"), expires_at=2000.0, lifetime=900.0, scopes=("a",))
STATE = StoredState(tokens=TOKENS, subject="urn:pleo:company:x", refresh_count=3, generation=7)
# A result its run could not write over its mark (kept by the helper, to write later).
PENDING = Pending(STATE.evolve(refresh_count=4), STATE.evolve(refresh_started_at=1000.0))


def frames(*docs: dict[str, Any]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for doc in docs:
        data = json.dumps(doc).encode()
        reader.feed_data(wire.HEADER.pack(len(data)) + data)
    reader.feed_eof()
    return reader


async def test_frames_end_with_none_at_a_clean_close() -> None:
    reader = frames({"a": 1}, {"b": [2]})
    assert await wire.receive(reader) == {"a": 1}
    assert await wire.receive(reader) == {"b": [2]}
    assert await wire.receive(reader) is None


@pytest.mark.parametrize(
    "data",
    [
        wire.HEADER.pack(10) + b"{}",  # closed inside a frame
        b"\x00\x00",  # closed inside a header
        wire.HEADER.pack(wire.MAX_FRAME + 1),
        wire.HEADER.pack(3) + b"[1]",
        wire.HEADER.pack(3) + b"{{{",
    ],
    ids=["short-body", "short-header", "too-large", "not-object", "not-json"],
)
async def test_a_broken_frame_is_a_wire_error(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(wire.WireError):
        await wire.receive(reader)


def settings(tmp_path: Path) -> wire.Settings:
    config = Config(
        pleo=Pleo(
            environment="sandbox",
            api_url="http://127.0.0.1:1",
            token_url="http://127.0.0.1:1/oauth/token",
            client_id="client",
            client_secret=Secret("the-client-secret"),
            scopes=("users:read", "test:test"),
            ca_file=tmp_path / "ca.pem",
        ),
        tokens=TokensConfig(
            store="redis",
            path=tmp_path / "t.enc",
            key_file=tmp_path / "t.key",
            redis_url="redis://x",
        ),
        timeouts=Timeouts(connect=1.0, read=2.0, token_request=3.0, shutdown=4.0),
        refresh=Refresh(max_concurrent=9, max_per_second=2.5),
    )
    return wire.Settings(
        config,
        {"PLEO_PROXY_KEY": "k"},
        proxy_url="http://proxy:3128",
        proxy_login="u",
        proxy_password="p",
        log_level="warning",
        log_format="json",
    )


def test_settings_arrive_whole_with_the_client_secret(tmp_path: Path) -> None:
    sent = settings(tmp_path)
    got = wire.parse_settings(json.loads(json.dumps(wire.settings_doc(sent))))
    assert got.config.pleo == sent.config.pleo  # the Secret compares by value
    assert got.config.tokens == sent.config.tokens
    assert got.config.timeouts == sent.config.timeouts
    assert (got.config.refresh.max_concurrent, got.config.refresh.max_per_second) == (9, 2.5)
    assert (got.key_environ, got.proxy_url, got.proxy_login, got.proxy_password) == (
        {"PLEO_PROXY_KEY": "k"},
        "http://proxy:3128",
        "u",
        "p",
    )
    assert (got.log_level, got.log_format) == ("warning", "json")


def test_settings_of_another_protocol_are_refused_without_naming_a_value(tmp_path: Path) -> None:
    doc = wire.settings_doc(settings(tmp_path))
    with pytest.raises(wire.WireError, match="protocol"):
        wire.parse_settings({**doc, "protocol": 99})
    del doc["tokens"]["key_file"]
    with pytest.raises(wire.WireError) as caught:
        wire.parse_settings(doc)
    assert "the-client-secret" not in str(caught.value)


def test_a_request_names_tokens_by_digest_only() -> None:
    rejected = bearer(TOKENS)
    wanted = Wanted.of(RefreshRequest(rejected=rejected, fresh_for=5.0, urgent=False), TOKENS)
    doc = wire.request_doc(wire.Request(4, "acme", wanted, 15.0))
    text = json.dumps(doc)
    assert "at-1" not in text
    assert "rt-1" not in text
    assert wire.parse_request(doc) == wire.Request(4, "acme", wanted, 15.0)
    assert wanted.rejected == token_digest(rejected)
    assert wanted.mine == token_digest(TOKENS.access_token)


def test_a_request_carries_the_askers_own_expiry() -> None:
    # The helper judges the asker's token by it (its steady clock), not its wall clock alone.
    wanted = Wanted.of(RefreshRequest(), TOKENS, mine_until=1234.5)
    doc = wire.request_doc(wire.Request(5, "acme", wanted, 15.0))
    assert wire.parse_request(doc).wanted.mine_until == 1234.5
    assert Wanted.of(RefreshRequest(), None, mine_until=1234.5).mine_until is None


def answer_for(result: Refreshed | BaseException) -> wire.Answer:
    events = wire.RecordedEvents()
    events.lock_waited(0.25)
    events.refreshed("ok")
    doc = wire.answer_doc(1, result, events=events, recorded=STATE, pending=PENDING)
    return wire.parse_answer(json.loads(json.dumps(doc)))


def test_a_refreshed_answer_carries_the_state_and_the_events() -> None:
    answer = answer_for(Refreshed(STATE, TOKENS, by_us=True, flushed=False))
    assert answer.outcome() == Refreshed(STATE, TOKENS, by_us=True, flushed=False)
    assert (answer.recorded, answer.pending) == (STATE, PENDING)
    counted: list[tuple[str, object]] = []

    class Counting(TokenEvents):
        def refreshed(self, outcome: str) -> None:
            counted.append(("refreshed", outcome))

        def lock_waited(self, seconds: float) -> None:
            counted.append(("lock_waited", seconds))

    wire.replay(answer.events, Counting())
    assert counted == [("lock_waited", 0.25), ("refreshed", "ok")]


@pytest.mark.parametrize(
    "raised",
    [
        ClientRejected("Pleo rejected the client"),
        FencedOut("the lock was lost"),
        LockTimeout("the lock stayed held for 25s"),
        StoreError("cannot write /x: No space left on device"),
        TransientOAuthError("token endpoint busy", retry_after=4.0, busy=True),
        OAuthError("token endpoint refused"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_failure_is_raised_again_as_it_was(raised: OAuthError | StoreError) -> None:
    with pytest.raises(type(raised)) as caught:
        answer_for(raised).outcome()
    assert type(caught.value) is type(raised)
    assert caught.value.detail == raised.detail
    for name in ("retry_after", "busy"):
        assert getattr(caught.value, name, None) == getattr(raised, name, None)


def test_an_ended_grant_and_nothing_to_refresh_keep_their_state() -> None:
    ended = STATE.evolve(tokens=None, reauth_reason="a refresh was interrupted")
    with pytest.raises(GrantEnded) as caught:
        answer_for(GrantEnded(ended)).outcome()
    assert caught.value.stored == ended
    with pytest.raises(NothingToRefresh) as nothing:
        answer_for(NothingToRefresh(None, detail="no refresh token is stored")).outcome()
    assert (nothing.value.stored, nothing.value.detail) == (None, "no refresh token is stored")


def test_an_unexpected_failure_is_transient_and_names_only_its_type() -> None:
    with pytest.raises(TransientOAuthError) as caught:
        answer_for(ValueError("at-1 leaked")).outcome()
    assert caught.value.detail == "the refresh helper failed (ValueError)"


def test_an_unknown_outcome_is_a_wire_error() -> None:
    with pytest.raises(wire.WireError):
        wire.outcome({"kind": "exploded"})
    with pytest.raises(wire.WireError):
        wire.parse_answer({"id": 1})


def test_a_promotion_names_the_request_and_a_broken_one_is_a_wire_error() -> None:
    assert wire.parse_promote(wire.promote_doc(7)) == 7
    with pytest.raises(wire.WireError):
        wire.parse_promote({"op": "promote", "id": "seven"})
