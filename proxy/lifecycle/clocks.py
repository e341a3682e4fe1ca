"""The steady clock, and the steady deadline of the access token a connection holds.

The wall clock gives Pleo's absolute expiry and every time that is stored or shared with
other processes; NTP and settimeofday step it, a VM migration may too. The steady clock
says how long things last here: CLOCK_BOOTTIME on Linux (never stepped, and it counts a
suspend, as Pleo's clock does), time.monotonic elsewhere. Must not read the store or
decide when to refresh (`rules` does, given both readings).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.lifecycle.rules import effective_expiry, steady_deadline
from proxy.tokenset import TokenSet

Clock = Callable[[], float]


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# time.monotonic stops while the host sleeps (CLOCK_MONOTONIC on Linux), so it is only
# the fallback where there is no boot-time clock (macOS, Windows).
steady_clock: Clock = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic


class Expiry:
    """One connection's token set and its steady deadline, taken once when it arrives.

    Taking it again for the same tokens would read a wall clock that may have been
    stepped since; so a token set keeps its deadline until another replaces it.
    """

    def __init__(self, *, wall: Clock, steady: Clock) -> None:
        self._wall = wall
        self._steady = steady
        self._tokens: TokenSet | None = None
        self._deadline: float | None = None

    def track(self, tokens: TokenSet | None) -> None:
        """`tokens` are now the connection's (from the store, a refresh or a grant)."""
        if tokens is None:
            self._tokens = self._deadline = None
            return
        if self._is_tracked(tokens):
            return
        self._tokens = tokens
        self._deadline = steady_deadline(tokens, wall_now=self._wall(), steady_now=self._steady())

    def expires_at(self, tokens: TokenSet, now: float) -> float:
        """When `tokens` expire, in the terms of `now` (a wall-clock reading)."""
        self.track(tokens)
        return effective_expiry(tokens, self._deadline, wall_now=now, steady_now=self._steady())

    def is_valid(self, tokens: TokenSet, now: float, *, for_at_least: float = 0.0) -> bool:
        """`TokenSet.is_valid`, judged on the earlier of the wall and steady expiries."""
        return now + for_at_least < self.expires_at(tokens, now)

    def _is_tracked(self, tokens: TokenSet) -> bool:
        # By value: a store re-read gives an equal copy of the same token set.
        tracked = self._tokens
        return tracked is tokens or (
            tracked is not None
            and tracked.expires_at == tokens.expires_at
            and tracked.access_token == tokens.access_token
        )
