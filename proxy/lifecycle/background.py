"""The background task of one connection: refresh when due, else watch the store.

A loop that never sleeps longer than BACKGROUND_TICK, so changes in the store and the
clock are noticed within it. Must not refresh on its own terms: the manager decides
what is due (`next_refresh_at`) and how a refresh runs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.lifecycle.rules import BACKGROUND_TICK, BACKOFF_CAP

if TYPE_CHECKING:
    from proxy.lifecycle.manager import TokenManager


async def keep_fresh(manager: TokenManager) -> None:
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
