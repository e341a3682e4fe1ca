"""The process-wide bound on token-endpoint calls, fair to Pleo and to waiting requests.

At most `refresh.max_concurrent` calls in flight, started no faster than
`refresh.max_per_second`, and none at all while Pleo asked everyone to wait (a 429 or
5xx, its `Retry-After` honoured). A call a request is waiting for goes before background
refreshes. Must not call Pleo itself or know what a refresh is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable


class TokenLimiter:
    """Slots for token-endpoint calls: `async with limiter.slot(urgent=True): ...`."""

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
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()
        self._background: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_start = 0.0  # the earliest the next call may start (rate)
        self._paused_until = 0.0  # Pleo asked to wait (429/5xx)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def slot(self, *, urgent: bool) -> AsyncIterator[None]:
        await self._acquire(urgent)
        try:
            yield
        finally:
            self._in_flight -= 1
            self._dispatch()

    def back_off(self, seconds: float) -> None:
        """Pleo answered 429 or 5xx: start no call for `seconds` (for every connection)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def _acquire(self, urgent: bool) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._background).append(waiter)
        self._dispatch()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._in_flight -= 1  # granted as we were cancelled: give it back
                self._dispatch()
            raise

    def _dispatch(self) -> None:
        """Grant free slots in order: urgent waiters first, each when rate and pause allow."""
        while self._in_flight < self._max:
            queue = self._urgent if self._urgent else self._background
            while queue and queue[0].done():
                queue.popleft()  # cancelled while waiting
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
