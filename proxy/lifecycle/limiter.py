"""The process-wide bound on token-endpoint calls, fair to Pleo and to waiting requests.

At most `refresh.max_concurrent` calls in flight, started no faster than
`refresh.max_per_second`, and none at all while Pleo asked everyone to wait (a 429 or
5xx, its `Retry-After` honoured). A call a request is waiting for goes before background
refreshes, also one a request came to wait for after it was queued (`Priority.promote`).
Must not call Pleo itself or know what a refresh is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator


class Priority:
    """How a call ranks among the waiters: urgent (a request waits for it) or background.

    Raised, never lowered: `promote()` when a request comes to wait for a call that was
    started in the background. A call still waiting then moves among the urgent ones; one
    already granted keeps its slot; a later call with this priority waits as urgent.
    """

    def __init__(self, *, urgent: bool) -> None:
        self._urgent = urgent
        self._watchers: list[Callable[[], None]] = []

    @property
    def urgent(self) -> bool:
        return self._urgent

    def promote(self) -> None:
        if self._urgent:
            return
        self._urgent = True
        for watcher in list(self._watchers):
            watcher()

    @contextlib.contextmanager
    def watch(self, on_promote: Callable[[], None]) -> Iterator[None]:
        """Call `on_promote()` if this is promoted while the block runs."""
        self._watchers.append(on_promote)
        try:
            yield
        finally:
            self._watchers.remove(on_promote)


class TokenLimiter:
    """Slots for token-endpoint calls: `async with limiter.slot(Priority(urgent=True)): ...`."""

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_per_second: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_concurrent
        self._interval = 1.0 / max_per_second if max_per_second else 0.0
        self._clock = clock
        self._in_flight = 0
        self.most_in_flight = 0
        # Waiters in order; a promoted one is in both, its background place skipped (done)
        # when it comes up: promotion is O(1), nothing is searched or removed.
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()
        self._background: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_start = 0.0  # the earliest the next call may start (rate)
        self._paused_until = 0.0  # Pleo asked to wait (429/5xx)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._in_flight -= 1
            self._dispatch()

    def back_off(self, seconds: float) -> None:
        """Pleo answered 429 or 5xx: start no call for `seconds` (for every connection)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def _acquire(self, priority: Priority) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if priority.urgent else self._background).append(waiter)
        self._dispatch()
        try:
            with priority.watch(lambda: self._promote(waiter)):
                await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._in_flight -= 1  # granted as we were cancelled: give it back
                self._dispatch()
            raise

    def _promote(self, waiter: asyncio.Future[None]) -> None:
        """A background waiter now has a request waiting on it: queue it among the urgent."""
        if waiter.done():
            return  # granted (or cancelled) already: nothing changes
        self._urgent.append(waiter)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant free slots in order: urgent waiters first, each when rate and pause allow."""
        while self._in_flight < self._max:
            queue = self._urgent if self._urgent else self._background
            while queue and queue[0].done():
                queue.popleft()  # cancelled while waiting, or granted from the other queue
            if not queue:
                if queue is self._urgent and self._background:
                    continue
                return
            wait = max(self._paused_until, self._next_start) - self._clock()
            if wait > 0:
                self._wake_in(wait)
                return
            queue.popleft().set_result(None)
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
            if self._interval:
                self._next_start = max(self._next_start, self._clock()) + self._interval

    def _wake_in(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()
