"""Token state in Redis, shared by several proxy instances, and the distributed refresh lock.

Owns the key layout (`pleo-proxy:<app id>:state|lock|version` for `default`,
`…:c:NAME:state|lock|version` for connection NAME, `…:connections|changes|probe:*`), the
index and change marker, and when the lock is taken. The lock and fencing scripts are
redislock.py's; the client and the mapping of redis-py errors are redisclient.py's.
Must not decide when to refresh, catch redis-py exceptions itself, touch files other
than the key file, or put a value, a token or a Redis password in a message.

Operating it. Every instance must use the same key: set PLEO_PROXY_KEY (or the systemd
credential) to the same value everywhere, or copy one key file to all of them; a value
sealed under another key is a StoreError naming both key ids. `save()` returns when Redis
has acknowledged the write script; whether that reply means "on disk" is Redis's persistence
setting. For the design's "persisted before used" rule run Redis with `appendonly yes` and
`appendfsync always` (Redis then fsyncs the AOF before it replies); without persistence a
Redis restart loses the tokens and the connection must be authorised again. An entry's
version key outlives the entry (a few bytes per deleted connection): versions never go
back, so a holder that read before a delete and a re-creation is still fenced out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import LockTimeout, StoreError
from proxy.names import DEFAULT_CONNECTION, check_name, is_valid_name
from proxy.store.crypto import seal
from proxy.store.redisclient import (
    DEFAULT_LOCK_TTL,
    DEFAULT_TIMEOUT,
    LOCK_MARGIN,
    WHAT,
    RedisBackend,
    redis_url,
)
from proxy.store.redislock import Entry, Fence, Lease, holder_id, holding, lease_for
from proxy.tokenset import StoredState, state_to_json

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger(__name__)

LOCK_POLL_MIN = 0.01
LOCK_POLL_MAX = 0.05
# Beside `<prefix>state|lock|version` (default) and `<prefix>c:NAME:state|lock|version`.
INDEX = "connections"
MARKER = "changes"
# A mark another holder left is that holder's to complete for this many lock TTLs.
MARK_GRACE_TTLS = 2


def key_prefix(client_id: str | None, api_url: str) -> str:
    """The key prefix of one Pleo connection, so several connections can share one Redis."""
    digest = hashlib.sha256(f"{client_id or ''}\n{api_url}".encode()).hexdigest()[:16]
    return f"pleo-proxy:{digest}:"


def config_prefix(config: Config) -> str:
    """The key prefix of the configured Pleo app (its client id and API)."""
    return key_prefix(config.pleo.client_id, config.pleo.api_url)


def entry_keys(prefix: str, name: str) -> Entry:
    """The key layout: `default` keeps the pre-connections keys; NAME gets `c:NAME:*`.

    Names cannot contain ':' (proxy/names.py), so no name's keys meet another's.
    """
    index = f"{prefix}{INDEX}"
    if name == DEFAULT_CONNECTION:
        # Not indexed: a pre-connections instance writes this key without the index.
        return Entry(f"{prefix}state", f"{prefix}version", f"{prefix}lock", index, None)
    base = f"{prefix}c:{name}:"
    return Entry(f"{base}state", f"{base}version", f"{base}lock", index, name)


class RedisStore:
    """The `TokenStore` of one connection, kept in one Redis value sealed like the token file.

    `RedisStore(url, ...)` makes and owns its `RedisBackend`; `sharing()` stores use one
    that their `RedisStores` owns and closes.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        key_file: Path,
        key: bytes | None = None,
        environ: Mapping[str, str] | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        backend = RedisBackend(
            url, key_file=key_file, key=key, environ=environ, lock_ttl=lock_ttl, timeout=timeout
        )
        self._bind(backend, prefix, owner=True)

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        return cls(
            redis_url(config),
            prefix=config_prefix(config),
            key_file=config.tokens.key_file,
            lock_ttl=config.timeouts.token_request + LOCK_MARGIN,
            timeout=config.timeouts.connect,
        )

    @classmethod
    def sharing(cls, backend: RedisBackend, *, prefix: str, name: str) -> RedisStore:
        """Connection `name`'s store on a shared `backend`: its owner closes that, not close()."""
        store = cls.__new__(cls)
        store._bind(backend, prefix, name=name, owner=False)
        return store

    def _bind(
        self, backend: RedisBackend, prefix: str, *, name: str = DEFAULT_CONNECTION, owner: bool
    ) -> None:
        self._backend = backend
        self._name = name
        self._keys = entry_keys(prefix, name)
        self._what = WHAT if name == DEFAULT_CONNECTION else f"{WHAT} for connection {name}"
        self._probe_prefix = f"{prefix}probe:"
        self._owner = owner
        self._closed = False
        self._fence = Fence(backend.client)

    @property
    def state_key(self) -> str:
        return self._keys.state

    @property
    def lock_key(self) -> str:
        return self._keys.lock

    @property
    def mark_grace(self) -> float:
        """A lock here can lapse while its holder lives on (frozen, cut off): its mark is
        left to it for a while before anyone may call the refresh interrupted."""
        return MARK_GRACE_TTLS * self._backend.lock_ttl

    async def load(self) -> StoredState | None:
        self._check_open()
        with self._backend.mapped("read the token state"):
            # One MGET: the value and its version as of one moment.
            blob, version = await self._backend.client.mget(self._keys.state, self._keys.version)
        lease = lease_for(self._keys.lock)
        if lease is not None:
            # What this holder has seen: its writes are fenced on it from now on.
            lease.version = int(version or 0)
        if blob is None:
            return None
        return await self._backend.open(_bytes(blob), name=self._name, what=self._what)

    async def save(self, state: StoredState) -> None:
        self._check_open()
        key = await self._backend.resolve_key(create=True)
        blob = seal(state_to_json(state), key, name=self._name)
        # One script sets the value, adds the name to the index and bumps the version;
        # its reply is Redis's acknowledgement (the module docstring says what that means
        # on disk). Under a lock it is fenced: FencedOut, and nothing written, otherwise.
        with self._backend.mapped("save the token state"):
            await self._fence.write(self._keys, blob, what=self._what)

    async def delete(self) -> None:
        self._check_open()
        with self._backend.mapped("delete the token state"):
            await self._forget()

    async def _forget(self, *, counter: str | None = None) -> None:
        """DEL the entry, SREM its name, bump its version and INCR `counter`, in one script.

        Unmapped: the caller wraps it in `mapped()` (delete() here, RedisStores.remove).
        """
        await self._fence.write(self._keys, None, counter=counter, what=self._what)

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """Exclusive across hosts, processes and tasks (a fresh id per call); not re-entrant.

        LockTimeout when the lock stayed held for `timeout` seconds; StoreError when Redis
        cannot be reached. While held, the lock's TTL is renewed every third of it, and
        every write of this entry by the holding task is fenced by it (redislock.py).
        """
        self._check_open()
        return self._locked(timeout)

    async def verify(self) -> None:
        self._check_open()
        await self._backend.check(self._probe_prefix, self.load)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owner:
            await self._backend.close()

    def _check_open(self) -> None:
        if self._closed or self._backend.closed:
            raise StoreError(f"token store {self._backend.display} is closed")

    # The lock.

    @asynccontextmanager
    async def _locked(self, wait: float) -> AsyncIterator[None]:
        holder = holder_id()
        lease = await self._acquire(holder, wait)
        extender = asyncio.create_task(self._keep_extending(holder), name="redis-lock-extend")
        try:
            with holding(lease):
                yield
        finally:
            extender.cancel()
            await asyncio.gather(extender, return_exceptions=True)
            # Shielded: a second cancellation must not leave the lock to its TTL.
            await asyncio.shield(self._release_quietly(holder))

    async def _acquire(self, holder: str, wait: float) -> Lease:
        """Poll SET NX with jittered sleeps until the lock is had or `wait` has passed."""
        deadline = time.monotonic() + wait
        try:
            while (lease := await self._try_lock(holder)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(
                        f"the refresh lock {self._keys.lock} in Redis at {self._backend.display}"
                        f" stayed held for {wait:g}s"
                    )
                # Jitter so that waiters do not poll in step; not security-relevant.
                pause = random.uniform(LOCK_POLL_MIN, LOCK_POLL_MAX)  # noqa: S311
                await asyncio.sleep(min(remaining, pause))
        except asyncio.CancelledError:
            # The SET may have reached Redis before the cancellation: take our id back
            # rather than leave a lock nobody holds until its TTL ends.
            await asyncio.shield(self._release_quietly(holder))
            raise
        return lease

    async def _try_lock(self, holder: str) -> Lease | None:
        with self._backend.mapped("take the refresh lock"):
            return await self._fence.acquire(self._keys, holder, self._ttl_ms())

    def _ttl_ms(self) -> int:
        return int(self._backend.lock_ttl * 1000)

    async def _keep_extending(self, holder: str) -> None:
        """Renew the lock's TTL every third of it, so a slow refresh never loses it."""
        while True:
            await asyncio.sleep(self._backend.lock_ttl / 3)
            try:
                with self._backend.mapped("extend the refresh lock"):
                    extended = await self._fence.extend(self._keys, holder, self._ttl_ms())
            except StoreError as exc:
                # Try again at the next tick: the TTL leaves two more chances.
                log.warning("could not extend the refresh lock: %s", exc.detail)
                continue
            if not extended:
                # Fenced: this holder's writes of the entry are refused from now on.
                log.error(
                    "the refresh lock %s expired while held; this instance's writes are refused",
                    self._keys.lock,
                )
                return

    async def _release_quietly(self, holder: str) -> None:
        """Compare-and-delete; failures are logged, as the lock expires by its TTL anyway."""
        try:
            with self._backend.mapped("release the refresh lock"):
                released = await self._fence.release(self._keys, holder)
        except StoreError as exc:
            log.warning("could not release the refresh lock (it will expire): %s", exc.detail)
            return
        if not released:
            log.debug("the refresh lock %s was not ours to release", self._keys.lock)


class RedisStores:
    """The `ConnectionStores` of one Redis: one client for every connection, however many.

    `<prefix>connections` is the set of names with an entry (`default` is never in it:
    its key is checked directly), `<prefix>changes` the counter `touch()` increments.
    """

    def __init__(self, backend: RedisBackend, *, prefix: str) -> None:
        self._backend = backend  # owned: close() closes it
        self._prefix = prefix
        self._index_key = f"{prefix}{INDEX}"
        self._marker_key = f"{prefix}{MARKER}"

    @classmethod
    def from_config(
        cls, config: Config, *, environ: Mapping[str, str] | None = None
    ) -> RedisStores:
        backend = RedisBackend.from_config(config, environ=environ)
        return cls(backend, prefix=config_prefix(config))

    def store(self, name: str) -> RedisStore:
        self._check_open()
        return RedisStore.sharing(self._backend, prefix=self._prefix, name=_checked(name))

    async def names(self) -> list[str]:
        self._check_open()
        client = self._backend.client
        with self._backend.mapped("list the connections"):
            members = await client.smembers(self._index_key)
            names = [DEFAULT_CONNECTION, *sorted(filter(_is_connection, map(_text, members)))]
            # The entries' own keys decide, as in exists(): an entry evicted or deleted
            # behind the index's back is not listed.
            async with client.pipeline(transaction=False) as batch:
                for name in names:
                    batch.exists(entry_keys(self._prefix, name).state)
                found = await batch.execute()
        return sorted(name for name, there in zip(names, found, strict=True) if there)

    async def exists(self, name: str) -> bool:
        self._check_open()
        with self._backend.mapped("read the token state"):
            state_key = entry_keys(self._prefix, _checked(name)).state
            return bool(await self._backend.client.exists(state_key))

    async def changed(self) -> str:
        self._check_open()
        with self._backend.mapped("read the change marker"):
            value = await self._backend.get(self._marker_key)
        return "" if value is None else _text(value)

    async def touch(self) -> None:
        self._check_open()
        with self._backend.mapped("update the change marker"):
            await self._backend.client.incr(self._marker_key)

    async def remove(self, name: str) -> None:
        self._check_open()
        with self._backend.mapped("remove the token state"):
            await self.store(name)._forget(counter=self._marker_key)

    async def verify(self) -> None:
        """PING, a probe write, and the `default` entry (if any) opens with the key.

        Only `default`'s, as before connections: a damaged entry of a connection made at
        run time fails that connection when it is used, never the start-up of the others.
        """
        self._check_open()
        await self.store(DEFAULT_CONNECTION).verify()

    async def close(self) -> None:
        await self._backend.close()

    def _check_open(self) -> None:
        if self._backend.closed:
            raise StoreError(f"token stores in Redis at {self._backend.display} are closed")


def _checked(name: str) -> str:
    # Names are validated by the caller; checked again because they become keys.
    return name if name == DEFAULT_CONNECTION else check_name(name)


def _bytes(value: bytes | str) -> bytes:
    # The client is made without decode_responses: values come back as bytes.
    return value.encode() if isinstance(value, str) else value


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _is_connection(name: str) -> bool:
    return name != DEFAULT_CONNECTION and is_valid_name(name)
