"""The connections in memory: their managers, least recently used first, each loaded once
however many ask for it at the same time, and no more idle ones than `connections.cache`.
Must not read the store, know which connections exist, or make a manager (it is given how).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

from proxy.lifecycle.manager import TokenManager

Start = Callable[[str], Awaitable[TokenManager]]


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


class ManagerCache:
    """Managers by name; lookups O(1), and `get` marks the connection used."""

    def __init__(self, start: Start, *, bound: int, pinned: frozenset[str]) -> None:
        """`start(name)`: make and start a manager, then `add` it; `bound`: how many
        managers to keep (0: all); `pinned`: names never dropped (configured ones)."""
        self._start = start
        self._bound = bound
        self._pinned = pinned
        self._managers: collections.OrderedDict[str, TokenManager] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future[TokenManager]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._managers

    def get(self, name: str) -> TokenManager | None:
        """The manager, now the most recently used (no I/O)."""
        manager = self._managers.get(name)
        if manager is not None:
            self._managers.move_to_end(name)
        return manager

    def peek(self, name: str) -> TokenManager | None:
        """The manager, its place in the order unchanged: for what no client asked."""
        return self._managers.get(name)

    def names(self) -> list[str]:
        return list(self._managers)

    def values(self) -> list[TokenManager]:
        return list(self._managers.values())

    async def load(self, name: str) -> TokenManager:
        """Single-flight: concurrent first uses of one name share one manager."""
        if name in self._managers:
            return self._managers[name]
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._start(name))
            self._loading[name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(pending)

    def add(self, manager: TokenManager) -> None:
        self._managers[manager.name] = manager

    def pop(self, name: str) -> TokenManager | None:
        """Take the manager out of memory; the caller closes it."""
        return self._managers.pop(name, None)

    def evict_over_bound(self) -> list[TokenManager]:
        """Drop (and close, in the background) the least recently used idle managers
        beyond the bound; returns them. A refresh in flight or unsaved tokens keep one."""
        evicted: list[TokenManager] = []
        if not self._bound or len(self._managers) <= self._bound:
            return evicted
        for name in list(self._managers):
            if len(self._managers) <= self._bound:
                break
            manager = self._managers[name]
            if name in self._pinned or manager.busy:
                continue
            del self._managers[name]
            evicted.append(manager)
            task = asyncio.ensure_future(manager.close())
            task.add_done_callback(_retrieved)
        return evicted

    async def close(self) -> None:
        """Close every manager in memory (each lets a refresh in flight persist first)."""
        managers, self._managers = self.values(), collections.OrderedDict()
        for manager in managers:
            await manager.close()
