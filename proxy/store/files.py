"""Every connection's token file in one state directory, and key rotation across them all.

Owns the layout: `default` is `tokens.path` as before connections; connection NAME is
`<state_dir>/connections/NAME.enc` (lock `NAME.enc.lock`), and `connections/.changes` holds
the change marker. Blocking calls run in a worker thread. Must not decide when to refresh,
touch the network, or put file contents in a message.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from proxy.errors import StoreError
from proxy.names import DEFAULT_CONNECTION, check_name, is_valid_name
from proxy.store.crypto import (
    check_envelope,
    format_key,
    generate_key,
    is_legacy,
    key_id,
    key_source,
    sealed_key_id,
)
from proxy.store.file import (
    FileBackend,
    FileStore,
    check_writable,
    old_key_path,
    remove,
    write_atomic,
)

if TYPE_CHECKING:
    from proxy.config import Config

CONNECTIONS_DIR = "connections"
ENTRY_SUFFIX = ".enc"
# Starts with a dot: no connection name can (proxy/names.py), so it never names an entry.
MARKER_NAME = ".changes"
ROTATE_LOCK_TIMEOUT = 30.0
# Re-check passes of a rotation before it gives up (see `_reseal_all`).
ROTATE_PASSES = 5

P = ParamSpec("P")
T = TypeVar("T")


class FileStores:
    """The `ConnectionStores` of one state directory: one `FileBackend` (key) for all files.

    Lock files are never deleted, not even by `remove()`: a process waiting on the old
    inode would otherwise hold a lock that a newcomer's new lock file does not exclude.
    """

    def __init__(
        self,
        path: Path,
        key: bytes | None = None,
        *,
        key_file: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._default_path = path
        self._directory = path.parent / CONNECTIONS_DIR
        self._marker = self._directory / MARKER_NAME
        self._backend = FileBackend(key, key_file=key_file, environ=environ)

    @classmethod
    def from_config(cls, config: Config, *, environ: Mapping[str, str] | None = None) -> FileStores:
        return cls(config.tokens.path, key_file=config.tokens.key_file, environ=environ)

    def path(self, name: str) -> Path:
        """Where connection `name`'s sealed state lives (ValueError for an invalid name)."""
        if name == DEFAULT_CONNECTION:
            return self._default_path
        # Names are validated by the caller; checked again because they become paths.
        return self._directory / f"{check_name(name)}{ENTRY_SUFFIX}"

    def store(self, name: str) -> FileStore:
        self._check_open()
        return FileStore.sharing(self.path(name), self._backend, name=name)

    async def names(self) -> list[str]:
        self._check_open()
        return await asyncio.to_thread(self._names_sync)

    async def exists(self, name: str) -> bool:
        self._check_open()
        return await asyncio.to_thread(_exists, self.path(name))

    async def changed(self) -> str:
        self._check_open()
        return await asyncio.to_thread(self._changed_sync)

    async def touch(self) -> None:
        self._check_open()
        # A fresh random value rather than a counter: no read-modify-write to race on.
        await asyncio.to_thread(write_atomic, self._marker, secrets.token_hex(16).encode())

    async def remove(self, name: str) -> None:
        self._check_open()
        await asyncio.to_thread(remove, self.path(name))
        await self.touch()

    async def verify(self) -> None:
        """Both directories writable; the key usable; `default`'s entry (if any) opens."""
        self._check_open()
        sample = await asyncio.to_thread(self._verify_sync)
        if sample is not None:
            await self.store(sample).load()

    async def close(self) -> None:
        self._backend.closed = True

    def _check_open(self) -> None:
        if self._backend.closed:
            raise StoreError(f"token stores in {self._default_path.parent} are closed")

    # Blocking halves, run in a worker thread.

    def _names_sync(self) -> list[str]:
        found = [DEFAULT_CONNECTION] if _exists(self._default_path) else []
        try:
            with os.scandir(self._directory) as entries:
                for entry in entries:
                    name = entry.name.removesuffix(ENTRY_SUFFIX)
                    # Temp, lock and marker files (and strays) do not name a connection.
                    is_entry = entry.name.endswith(ENTRY_SUFFIX) and entry.is_file()
                    if is_entry and _is_connection(name):
                        found.append(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot list {self._directory}: {exc.strerror}") from None
        return sorted(found)

    def _changed_sync(self) -> str:
        try:
            return self._marker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError):
            raise StoreError(f"cannot read the change marker {self._marker}") from None

    def _verify_sync(self) -> str | None:
        """Check both directories; resolve the key; the name of one entry to open, if any."""
        check_writable(self._default_path.parent)
        check_writable(self._directory)
        names = self._names_sync()
        sample = None
        # Only `default`'s entry, as before connections: a damaged entry of a connection
        # made at run time fails that connection when used, never the others' start-up.
        if DEFAULT_CONNECTION in names:
            sample = DEFAULT_CONNECTION
            # The envelope first: a foreign or damaged file is reported as such, not as
            # a missing key.
            blob = _read_sync(self.path(sample))
            if blob is not None:
                check_envelope(blob, what=f"token file {self.path(sample)}")
        # No entry yet: the key may be created. With entries it must already exist, or
        # a new key would be made that opens none of them.
        self._backend.keys(create=not names)
        return sample

    def _stale_sync(self, kid: str) -> list[str]:
        """The connections whose entry is not sealed under the key with id `kid`, or is in
        the old format (a rotation rewrites those too, whichever key sealed them)."""
        stale = []
        for name in self._names_sync():
            try:
                blob = self.path(name).read_bytes()
            except FileNotFoundError:
                continue  # removed since it was listed
            except OSError as exc:
                raise StoreError(f"cannot read {self.path(name)}: {exc.strerror}") from None
            if sealed_key_id(blob, what=f"token file {self.path(name)}") != kid or is_legacy(blob):
                stale.append(name)
        return stale


def _read_sync(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read token file {path}: {exc.strerror}") from None


def _is_connection(name: str) -> bool:
    return name != DEFAULT_CONNECTION and is_valid_name(name)


def _exists(path: Path) -> bool:
    """Whether `path` is a regular file (one stat), as `names()` counts entries."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StoreError(f"cannot check {path}: {exc.strerror}") from None


async def rotate_key(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    lock_timeout: float = ROTATE_LOCK_TIMEOUT,
) -> str:
    """Re-seal every connection's token file under a new key file; returns the new key id.

    Refused (StoreError) when the key comes from PLEO_PROXY_KEY or a systemd credential:
    pleo-proxy cannot rewrite those; rotate them where they are set. The `default`
    connection's lock is held throughout (two rotations never interleave) and each other
    connection's lock while its file is re-sealed, so no refresh is lost to a rotation.
    """
    env = os.environ if environ is None else environ
    source = key_source(env)
    if source is not None:
        raise StoreError(
            f"the token key comes from {source}, which pleo-proxy cannot rewrite;"
            " rotate it where it is set"
        )
    stores = FileStores(config.tokens.path, key_file=config.tokens.key_file, environ=env)
    try:
        async with stores.store(DEFAULT_CONNECTION).lock(lock_timeout):
            return await _rotate(stores, lock_timeout)
    finally:
        await stores.close()


async def _rotate(stores: FileStores, wait: float) -> str:
    key_file = stores._backend.key_file
    old_path = old_key_path(key_file)
    # Every entry must open before anything changes; if one does not, nothing has.
    for name in await stores.names():
        await stores.store(name).load()
    current = (await _to_the_end(stores._backend.keys, create=True))[0]
    if await asyncio.to_thread(old_path.exists):
        # An earlier rotation stopped before it finished: finish it first, so that
        # overwriting `.old` below cannot lose the only key that opens some entry.
        await _reseal_all(stores, current, wait)
        await _to_the_end(remove, old_path)
    # Order matters for crash safety: keep the old key, then switch the key, then re-seal
    # every entry; a crash at any point leaves a key on disk that opens each of them.
    await _to_the_end(write_atomic, old_path, format_key(current))
    new = generate_key()
    await _to_the_end(write_atomic, key_file, format_key(new))
    await _reseal_all(stores, new, wait)
    await _to_the_end(remove, old_path)
    return key_id(new)


async def _reseal_all(stores: FileStores, key: bytes, wait: float) -> None:
    """Re-seal every entry under `key`, then re-check until a pass finds none left over.

    The re-check catches an entry a running proxy sealed with the key it read just
    before the switch (a new connection, say, created after the listing).
    """
    kid = key_id(key)
    for _ in range(ROTATE_PASSES):
        stale = await asyncio.to_thread(stores._stale_sync, kid)
        if not stale:
            return
        for name in stale:
            await _reseal(stores, name, key, wait)
    raise StoreError(
        f"token files in {stores._directory} kept being sealed under another key;"
        f" the previous key is kept in {old_key_path(stores._backend.key_file)}"
    )


async def _reseal(stores: FileStores, name: str, key: bytes, wait: float) -> None:
    store = stores.store(name)
    if name == DEFAULT_CONNECTION:
        # rotate_key holds this lock already, and flock locks are not re-entrant.
        await _to_the_end(store.reseal_sync, key)
        return
    async with store.lock(wait):
        await _to_the_end(store.reseal_sync, key)


async def _to_the_end(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking `func` in a thread; if cancelled, first wait for the thread to end.

    A thread cannot be stopped: returning early would release a lock under a write.
    """
    work = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation is what we report
        raise
