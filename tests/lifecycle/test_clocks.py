"""The steady clock and the expiry rules: a stepped wall clock, a suspend, a migration.

Pure rules and one small tracker, so plain synchronous tests with clocks set by hand.
"""

from __future__ import annotations

import time

from proxy.config import Refresh
from proxy.lifecycle.clocks import Expiry, steady_clock
from proxy.lifecycle.rules import effective_expiry, refresh_due, steady_deadline
from proxy.secret import Secret
from proxy.tokenset import StoredState, TokenSet

HOUR = 3600.0
WALL = 1_750_000_000.0  # the wall clock when the token arrives
STEADY = 500.0  # the steady clock then (seconds since boot, say)


class Hand:
    """A clock set by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token(*, left: float, lifetime: float = 600.0, name: str = "a") -> TokenSet:
    """A token set with `left` seconds to live at WALL."""
    return TokenSet(Secret(name), Secret("r"), expires_at=WALL + left, lifetime=lifetime)


def test_the_steady_clock_is_boot_time_on_linux_and_never_goes_back() -> None:
    if hasattr(time, "CLOCK_BOOTTIME"):
        # It counts a suspend: never behind the monotonic clock, which does not.
        assert steady_clock() >= time.monotonic() - 0.01
        assert abs(steady_clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    readings = [steady_clock() for _ in range(1000)]
    assert readings == sorted(readings)


def test_a_steady_deadline_is_what_the_wall_clock_says_is_left() -> None:
    tokens = token(left=300)
    assert steady_deadline(tokens, wall_now=WALL, steady_now=STEADY) == STEADY + 300


def test_a_steady_deadline_is_never_more_than_one_lifetime_away() -> None:
    # The wall clock was stepped back an hour after Pleo issued it: an hour more is not real.
    tokens = token(left=300 + HOUR)
    assert steady_deadline(tokens, wall_now=WALL, steady_now=STEADY) == STEADY + 600


def test_without_a_steady_deadline_the_stored_expiry_alone_counts() -> None:
    tokens = token(left=300)
    assert effective_expiry(tokens, None, wall_now=WALL + 10, steady_now=0.0) == WALL + 300


def test_a_wall_clock_stepped_back_keeps_the_real_expiry() -> None:
    tokens = token(left=300)
    deadline = steady_deadline(tokens, wall_now=WALL, steady_now=STEADY)
    # 100 s later the wall clock is stepped back an hour; the steady one is not.
    expires = effective_expiry(
        tokens, deadline, wall_now=WALL + 100 - HOUR, steady_now=STEADY + 100
    )
    assert expires == WALL - HOUR + 300, "still 200 s left, in the stepped clock's terms"
    assert tokens.is_valid(WALL + 300 - HOUR), "on the stored expiry alone: an hour more"


def test_a_wall_clock_stepped_forward_expires_the_token_at_once() -> None:
    tokens = token(left=300)
    deadline = steady_deadline(tokens, wall_now=WALL, steady_now=STEADY)
    now = WALL + 10 + HOUR
    assert effective_expiry(tokens, deadline, wall_now=now, steady_now=STEADY + 10) < now


def test_a_resume_after_a_suspend_expires_the_token_on_the_steady_clock_alone() -> None:
    # The host slept an hour; suppose the wall clock is not corrected yet: boot time counts it.
    tokens = token(left=300)
    deadline = steady_deadline(tokens, wall_now=WALL, steady_now=STEADY)
    expires = effective_expiry(tokens, deadline, wall_now=WALL + 10, steady_now=STEADY + HOUR)
    assert expires < WALL + 10


def test_due_times_follow_the_effective_expiry_and_keep_their_spread() -> None:
    refresh = Refresh(before_expiry=60)
    stored = StoredState(tokens=token(left=300), obtained_at=WALL)
    plain = refresh_due(stored, refresh, now=WALL, last_used=WALL, jitter=True)
    earlier = refresh_due(
        stored, refresh, now=WALL, last_used=WALL, jitter=True, expires_at=WALL + 200
    )
    assert plain is not None
    assert earlier is not None
    assert not plain.keepalive
    assert not earlier.keepalive
    assert plain.at - earlier.at == 100, "the same spread: keyed on the stored expiry"


def test_a_tracked_token_keeps_its_deadline_through_a_step_back() -> None:
    wall, steady = Hand(WALL), Hand(STEADY)
    expiry = Expiry(wall=wall, steady=steady)
    tokens = token(left=300)
    expiry.track(tokens)
    wall.now -= HOUR  # stepped back; then the store is re-read and gives an equal copy
    steady.now += 100
    copy = TokenSet(Secret("a"), Secret("r"), expires_at=tokens.expires_at, lifetime=600)
    expiry.track(copy)
    assert expiry.expires_at(copy, wall.now) == wall.now + 200
    assert expiry.is_valid(copy, wall.now, for_at_least=199)
    assert not expiry.is_valid(copy, wall.now, for_at_least=200)
    steady.now += 200
    assert not expiry.is_valid(copy, wall.now), "expired on the steady clock"


def test_new_tokens_get_a_deadline_of_their_own() -> None:
    wall, steady = Hand(WALL), Hand(STEADY)
    expiry = Expiry(wall=wall, steady=steady)
    expiry.track(token(left=10))
    steady.now += 20
    wall.now += 20
    fresh = TokenSet(Secret("b"), Secret("r2"), expires_at=wall.now + 600, lifetime=600)
    assert expiry.is_valid(fresh, wall.now, for_at_least=599)
    expiry.track(None)
    assert expiry.expires_at(fresh, wall.now) == wall.now + 600
