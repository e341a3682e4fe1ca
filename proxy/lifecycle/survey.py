"""The survey of connections not in memory: their entries read a few at a time, so that
reading 10,000 never holds up requests, and the keep-alive due time each one means.
Must not load a manager, refresh, or write the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable

from proxy.config import Refresh
from proxy.errors import StoreError
from proxy.lifecycle.rules import Due, refresh_due
from proxy.store import ConnectionStores
from proxy.tokenset import StoredState

log = logging.getLogger("proxy.connections")

SURVEY_BATCH = 200  # entries read between pauses...
SURVEY_PAUSE = 0.05  # ...of this long


async def read_entries(
    stores: ConnectionStores, names: Iterable[str], *, skip: Callable[[str], bool]
) -> AsyncGenerator[tuple[str, StoredState | None]]:
    """Each name's entry, but none for which `skip(name)` holds, before or after the read
    (a connection loaded meanwhile schedules itself). An unreadable one is logged, left out."""
    for index, name in enumerate(names):
        if skip(name):
            continue
        try:
            stored = await stores.store(name).load()
        except StoreError as exc:
            log.error("connection %s cannot be read: %s", name, exc.detail)
            continue
        if skip(name):
            continue
        yield name, stored
        if index % SURVEY_BATCH == SURVEY_BATCH - 1:
            await asyncio.sleep(SURVEY_PAUSE)


def unused_due(stored: StoredState | None, refresh: Refresh, *, now: float) -> Due | None:
    """The due time of a connection not in memory: nobody here used it, so a keep-alive."""
    return refresh_due(stored, refresh, now=now, last_used=-1e18, jitter=True)
