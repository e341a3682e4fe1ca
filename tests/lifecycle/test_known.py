"""Which connections exist, without I/O: the implied one, states, subjects, misses."""

from __future__ import annotations

from proxy.lifecycle.known import MAX_MISSES, MISS_INTERVAL, KnownConnections
from proxy.secret import Secret
from proxy.tokenset import StoredState, TokenSet


def test_the_implied_connection_is_default_else_the_only_one() -> None:
    known = KnownConnections(["default", "acme"])
    assert known.implied() == "default"
    alone = KnownConnections([])
    assert alone.implied() is None
    alone.add(["acme"])
    assert alone.implied() == "acme"
    alone.add(["beta"])
    assert alone.implied() is None
    assert alone.names() == ["acme", "beta"]
    assert alone.missing_from({"beta"}) == ["acme"]


def test_states_of_connections_not_in_memory_are_counted_with_those_in_it() -> None:
    known = KnownConnections(["a", "b", "c"])
    tokens = TokenSet(Secret("at"), Secret("rt"), expires_at=1e10, lifetime=60)
    known.note_entry("a", StoredState(tokens=tokens, subject="urn:x"))
    known.note_entry("b", None)
    known.note_state("c", "authorised")
    counts = known.state_counts({"c": "refreshing"})  # in memory: its current state wins
    assert counts == {"authorised": 1, "unauthorised": 1, "refreshing": 1}
    known.forget("a")
    assert "a" not in known
    assert known.state_counts({}) == {"unauthorised": 1, "authorised": 1}


def test_the_same_subject_is_found_in_memory_or_not() -> None:
    known = KnownConnections([])
    known.add(["a", "b", "c"])
    known.note_entry("a", StoredState(subject="urn:x"))
    assert known.same_subject("c", "urn:x", {"b": "urn:x"}) == ["a", "b"]
    assert known.same_subject("c", "urn:x", {}) == ["a", "b"], "kept once seen in memory"
    assert known.same_subject("a", "urn:y", {}) == []


def test_a_miss_is_remembered_for_an_interval_and_memory_stays_bounded() -> None:
    known = KnownConnections([])
    known.remember_miss("ghost", 100.0)
    assert known.missed_lately("ghost", 100.0 + MISS_INTERVAL / 2)
    assert not known.missed_lately("ghost", 100.0 + MISS_INTERVAL)
    known.found("ghost")
    assert "ghost" in known
    assert not known.missed_lately("ghost", 100.0)
    for index in range(MAX_MISSES + 1):
        known.remember_miss(f"n{index}", 0.0)
    assert not known.missed_lately("n0", 0.0), "the table was cleared, not grown"
