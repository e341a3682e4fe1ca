"""The token store interfaces, and the factories that open the configured backend.

A `TokenStore` persists one connection's `StoredState`, sealed at rest, and offers a lock
that excludes other processes (and other hosts, for Redis) during a refresh. A
`ConnectionStores` hands out every connection's `TokenStore` on one shared backend.
Neither decides when to refresh, nor validates names (proxy/names.py does).
"""

from __future__ import annotations

from collections.abc import Mapping
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
        """Exclusive across processes; raises LockTimeout after `timeout` seconds.

        A store whose lock can lapse while its holder lives (`mark_grace` not None) fences
        the holder's writes: FencedOut, nothing written, once the lock is lost or the
        entry changed since the holder read it.
        """

    @property
    def mark_grace(self) -> float | None:
        """Seconds an in-progress mark found under the lock stays its writer's to complete.

        None: a lock here ends only with its holder (a file lock with its process), so a
        mark found under it is a dead refresh's. A number: the lock can lapse while its
        holder lives on (frozen, cut off), and that holder may still write its result.
        """

    async def verify(self) -> None:
        """Start-up check: the location is writable and the key usable. StoreError if not."""

    async def close(self) -> None:
        """Release resources. Idempotent."""


class ConnectionStores(Protocol):
    """Every connection's TokenStore in one backend (one state directory / one Redis client).

    Implementations: files (FileStores), redis (RedisStores). The stores `store()` hands
    out share this object's resources: closing one of them ends only that handle, and
    `close()` here releases the shared resources and ends every handle.
    """

    def store(self, name: str) -> TokenStore:
        """Connection `name`'s store (`default` at the pre-connections location). No I/O."""

    async def names(self) -> list[str]:
        """Sorted names of the connections that have an entry. O(n): not for the request path."""

    async def exists(self, name: str) -> bool:
        """Whether connection `name` has an entry. O(1)."""

    async def changed(self) -> str:
        """A cheap marker (one read) that differs after any `touch()` or `remove()`."""

    async def touch(self) -> None:
        """Change the marker: a connection was created, authorised or given tokens."""

    async def remove(self, name: str) -> None:
        """Delete `name`'s entry (if any) and change the marker; the caller holds its lock."""

    async def verify(self) -> None:
        """Start-up check of the whole backend: writable, key usable. StoreError if not."""

    async def close(self) -> None:
        """Release the shared resources. Idempotent."""


def open_stores(config: Config, *, environ: Mapping[str, str] | None = None) -> ConnectionStores:
    """Every connection's store, on the backend the configuration names.

    `environ` is where the key is looked up (PLEO_PROXY_KEY, CREDENTIALS_DIRECTORY), by
    default this process's environment; the refresh helper passes what its proxy sent.
    """
    if config.tokens.store == "redis":
        from proxy.store.redis import RedisStores

        return RedisStores.from_config(config, environ=environ)
    from proxy.store.files import FileStores

    return FileStores.from_config(config, environ=environ)


def open_store(config: Config) -> TokenStore:
    """The `default` connection's store, owning its resources (its close() releases them)."""
    if config.tokens.store == "redis":
        from proxy.store.redis import RedisStore

        return RedisStore.from_config(config)
    from proxy.store.file import FileStore

    return FileStore.from_config(config)
