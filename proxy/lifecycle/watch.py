"""The store's change marker, read once a second (one stat or GET): whether a connection
was created, authorised or deleted elsewhere since, and which names the store holds then.
Must not load, drop or refresh a connection: the registry does, told what the store holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proxy.errors import StoreError
from proxy.store import ConnectionStores

log = logging.getLogger("proxy.connections")

WATCH_INTERVAL = 1.0  # how often the store's change marker is read


class ChangeMarker:
    """The marker as last seen; `names_if_changed()` compares it with the store's."""

    def __init__(self, stores: ConnectionStores) -> None:
        self._stores = stores
        self._seen = ""

    async def start(self) -> None:
        """Take the store's marker as seen: what is there now is read at start-up."""
        self._seen = await self._stores.changed()

    async def names_if_changed(self) -> set[str] | None:
        """The names with an entry if the marker moved since last seen, else None (O(1))."""
        marker = await self._stores.changed()
        if marker == self._seen:
            return None
        self._seen = marker
        return set(await self._stores.names())


async def every_interval(step: Callable[[], Awaitable[None]]) -> None:
    """Run `step` each WATCH_INTERVAL until cancelled; a store that fails is tried again."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        try:
            await step()
        except StoreError as exc:
            log.warning("could not check the store for changed connections: %s", exc.detail)
