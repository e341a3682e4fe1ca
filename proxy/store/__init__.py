"""The token store interface, and the factory that opens the configured one.

A store persists one `StoredState` per Pleo connection, sealed at rest, and offers a
lock that excludes other processes (and other hosts, for Redis) during a refresh.
It never decides when to refresh.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from proxy.tokenset import StoredState

if TYPE_CHECKING:
    from proxy.config import Config


class TokenStore(Protocol):
    """Where the tokens of one connection live. Implementations: file, redis."""

    async def load(self) -> StoredState | None:
        """The stored state, or None when nothing is stored. StoreError if unreadable."""

    async def save(self, state: StoredState) -> None:
        """Persist durably (fsync'd / acknowledged) before returning. Atomic."""

    async def delete(self) -> None:
        """Remove the stored state (logout, ended grant). No error if absent."""

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """Exclusive across processes; raises LockTimeout after `timeout` seconds."""

    async def verify(self) -> None:
        """Start-up check: the location is writable and the key usable. StoreError if not."""

    async def close(self) -> None:
        """Release resources. Idempotent."""


def open_store(config: Config) -> TokenStore:
    """The store the configuration names."""
    if config.tokens.store == "redis":
        from proxy.store.redis import RedisStore

        return RedisStore.from_config(config)
    from proxy.store.file import FileStore

    return FileStore.from_config(config)
