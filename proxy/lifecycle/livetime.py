"""A timeout that counts only the time this process ran: `live_timeout(seconds)`.

A process that was stopped (SIGSTOP, a paused container, a suspended host) resumes with
its timers long overdue, and a plain timeout fires before the answer that arrived in the
meantime is read: a token request that Pleo answered would be given up on, its rotated
tokens lost. Here a gap between two ticks longer than two ticks counts as two ticks.
Must not know what it times (oauth.py uses it for the token endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

TICK = 0.25


@contextlib.asynccontextmanager
async def live_timeout(seconds: float) -> AsyncIterator[None]:
    """Like `asyncio.timeout(seconds)` (TimeoutError), with stopped time not counted."""
    async with asyncio.timeout(None) as scope:
        watchdog = asyncio.create_task(_watch(scope, seconds), name="live-timeout")
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def _watch(scope: asyncio.Timeout, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    used = 0.0
    last = time.monotonic()
    while used < seconds:
        await asyncio.sleep(min(TICK, seconds - used))
        now = time.monotonic()
        # Resumed after a stop, this wakes in the same loop turn as the reader of what
        # arrived meanwhile; the gap counts as two ticks, so that reader goes first.
        used += min(now - last, 2 * TICK)
        last = now
    scope.reschedule(loop.time())
