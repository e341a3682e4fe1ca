"""The background task of one connection: refresh when due, else watch the store.

A loop that never sleeps longer than BACKGROUND_TICK, so changes in the store and the
clock are noticed within it. Must not refresh on its own terms: the manager decides
what is due (`next_refresh_at`) and how a refresh runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from proxy.lifecycle.rules import BACKGROUND_TICK, BACKOFF_CAP


class Refreshable(Protocol):
    """What the loop needs of a token manager (which imports this module)."""

    poll_store: bool

    @property
    def clock(self) -> Callable[[], float]: ...

    def next_refresh_at(self, now: float, *, jitter: bool = False) -> float | None: ...

    async def reread_if_due(self) -> None: ...

    async def refresh_in_background(self, *, jitter: bool = False) -> bool: ...


async def keep_fresh(manager: Refreshable) -> None:
    """Run until cancelled: proactive and keep-alive refreshes of `manager`'s tokens."""
    while True:
        now = manager.clock()
        due = manager.next_refresh_at(now)
        if due is None:
            if manager.poll_store:
                await manager.reread_if_due()
            await asyncio.sleep(BACKGROUND_TICK)
            continue
        if due > now:
            await asyncio.sleep(min(due - now, BACKGROUND_TICK))
            continue
        if not await manager.refresh_in_background():
            await asyncio.sleep(BACKOFF_CAP)
