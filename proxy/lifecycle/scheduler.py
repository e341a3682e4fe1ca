"""One refresh scheduler for every connection: due times in two heaps, a few workers.

Each connection has at most one entry — its next due time, proactive (before expiry,
while in use) or keep-alive — instead of a task or timer of its own. `refresh.
max_concurrent` workers take due entries, proactive before keep-alive, and ask the
connection's manager to refresh; the limiter then puts requests waiting for a token
ahead of them. Entries are replaced, not updated: a stale one is skipped when popped.
Due times come in wall-clock terms and are kept on the steady clock (`clocks`), so a
stepped wall clock moves none of them. Must not refresh by itself, read the store, or
keep a connection in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proxy.lifecycle.clocks import Clock, steady_clock
from proxy.lifecycle.rules import BACKOFF_CAP, Due

if TYPE_CHECKING:
    from proxy.lifecycle.manager import TokenManager

log = logging.getLogger("proxy.tokens")

Lookup = Callable[[str], Awaitable["TokenManager | None"]]
Entry = tuple[float, int, str]  # (due on the steady clock, sequence, connection)
MIN_GAP = 1.0  # seconds between two background refreshes of one connection, at least
# The longest a worker sleeps before it looks at the steady clock again. The loop's
# timers run on CLOCK_MONOTONIC, which stands still while the host is suspended: after a
# resume, what came due meanwhile is seen within this, not when a long sleep would end.
MAX_SLEEP = 1.0


class RefreshScheduler:
    """Due times of every connection; `schedule()` is O(log n), no I/O."""

    def __init__(
        self, lookup: Lookup, *, clock: Clock, workers: int, steady: Clock = steady_clock
    ) -> None:
        """`clock`: the wall clock due times are given in; `steady`: the one they are kept on."""
        self._lookup = lookup
        self._clock = clock
        self._steady = steady
        self._workers_wanted = workers
        self._proactive: list[Entry] = []
        self._keepalive: list[Entry] = []
        self._current: dict[str, int] = {}  # connection → sequence of its live entry
        self._seq = 0
        self._changed = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self.refreshes = 0

    def __len__(self) -> int:
        return len(self._current)

    def schedule(self, name: str, due: Due | None) -> None:
        """`name`'s next refresh (None: nothing due until its state changes)."""
        if due is None:
            self._current.pop(name, None)
            return
        self._seq += 1
        self._current[name] = self._seq
        heap = self._keepalive if due.keepalive else self._proactive
        # Converted once, now: later wall readings may be stepped, steady ones are not.
        at = self._steady() + (due.at - self._clock())
        heapq.heappush(heap, (at, self._seq, name))
        self._changed.set()

    def due_of(self, name: str) -> float | None:
        """For tests and status: when `name` is due (wall-clock terms), if it is scheduled."""
        seq = self._current.get(name)
        for heap in (self._proactive, self._keepalive):
            for at, entry_seq, entry_name in heap:
                if entry_name == name and entry_seq == seq:
                    return self._clock() + (at - self._steady())
        return None

    async def start(self) -> None:
        for index in range(self._workers_wanted):
            self._workers.append(asyncio.create_task(self._work(), name=f"refresh-{index}"))

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()

    # -- the workers -------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            name = await self._next_due()
            self._current.pop(name, None)
            try:
                await self._refresh(name)
            except Exception:
                # A worker must survive any one connection's failure.
                log.exception("background refresh of a connection failed unexpectedly")

    async def _next_due(self) -> str:
        """Wait for the earliest live entry to come due; proactive ones go first."""
        while True:
            self._drop_stale()
            now = self._steady()
            for heap in (self._proactive, self._keepalive):
                if heap and heap[0][0] <= now:
                    return heapq.heappop(heap)[2]
            tops = [heap[0][0] for heap in (self._proactive, self._keepalive) if heap]
            self._changed.clear()
            timeout = min(min(tops) - now, MAX_SLEEP) if tops else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _drop_stale(self) -> None:
        for heap in (self._proactive, self._keepalive):
            while heap and self._current.get(heap[0][2]) != heap[0][1]:
                heapq.heappop(heap)

    async def _refresh(self, name: str) -> None:
        manager = await self._lookup(name)
        if manager is None:
            return  # deleted meanwhile
        now = self._clock()
        due = manager.next_refresh(now, jitter=True)
        if due is None:
            return
        if due.at > now:
            self.schedule(name, due)  # it changed since (used, refreshed elsewhere)
            return
        self.refreshes += 1
        if not await manager.refresh_in_background(jitter=True):
            # Tried again after the longest backoff; the state change reschedules otherwise.
            self.schedule(name, Due(self._clock() + BACKOFF_CAP, keepalive=due.keepalive))
            return
        after = manager.next_refresh(self._clock(), jitter=True)
        if after is not None and after.at <= self._clock():
            # Still due right after a refresh: never spin on one connection.
            after = Due(self._clock() + MIN_GAP, keepalive=after.keepalive)
        self.schedule(name, after)
