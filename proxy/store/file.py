"""One connection's encrypted token file: sealed state, atomic fsync'd writes, `flock` lock.

Owns the layout beside one token file (`<path>.lock`, temp files, reading `<key_file>.old`
during a key rotation); every connection's files and key rotation are files.py's. Blocking
file calls run in a worker thread. Must not decide when to refresh, touch the network, or
put file contents in a message.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import LockTimeout, StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store.crypto import (
    check_envelope,
    fsync_dir,
    key_source,
    load_key,
    open_sealed,
    read_key_file,
    seal,
    write_private,
)
from proxy.tokenset import StoredState, state_from_json, state_to_json

if TYPE_CHECKING:
    from proxy.config import Config

LOCK_POLL_MIN = 0.01
LOCK_POLL_MAX = 0.05


class FileBackend:
    """The sealing key of one state directory's token files, and whether they are closed.

    The key is `key` when given, else resolved on every use by `load_key` (environment,
    systemd credential, or `key_file`, created when a write needs it). Reading it each
    time is cheap and means a `rotate_key` run by another process is picked up without a
    restart. While `<key_file>.old` exists (a rotation in progress or interrupted), it is
    also offered for opening. Shared by every connection's FileStore in a `FileStores`.
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        key_file: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.key_file = key_file
        self.closed = False
        self._key = key
        self._environ = environ

    def keys(self, *, create: bool) -> list[bytes]:
        """The key to seal with first, then any older key still accepted for opening."""
        if self._key is not None:
            return [self._key]
        environ = os.environ if self._environ is None else self._environ
        keys = [load_key(self.key_file, environ=environ, create=create)]
        if key_source(environ) is None:
            with suppress(FileNotFoundError):
                keys.append(read_key_file(old_key_path(self.key_file)))
        return keys


class FileStore:
    """The `TokenStore` kept in one AES-GCM-sealed file; the key as `FileBackend` resolves it."""

    def __init__(
        self,
        path: Path,
        key: bytes | None = None,
        *,
        key_file: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """The `default` connection's store at `path` (`tokens.path`), as before connections."""
        backend = FileBackend(key, key_file=key_file, environ=environ)
        self._bind(path, backend, name=DEFAULT_CONNECTION, owner=True)

    @classmethod
    def from_config(cls, config: Config) -> FileStore:
        return cls(config.tokens.path, key_file=config.tokens.key_file)

    @classmethod
    def sharing(cls, path: Path, backend: FileBackend, *, name: str) -> FileStore:
        """Connection `name`'s store at `path` on a shared `backend`: its owner closes that,
        not this close()."""
        store = cls.__new__(cls)
        store._bind(path, backend, name=name, owner=False)
        return store

    def _bind(self, path: Path, backend: FileBackend, *, name: str, owner: bool) -> None:
        self._path = path
        self._name = name
        self._lock_path = path.with_name(f"{path.name}.lock")
        self._backend = backend
        self._owner = owner
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        """The connection whose entry this is: what its file is sealed as."""
        return self._name

    @property
    def mark_grace(self) -> None:
        """flock locks end with their process: a mark found under one is a dead refresh's."""
        return None

    async def load(self) -> StoredState | None:
        self._check_open()
        return await asyncio.to_thread(self._load_sync)

    async def save(self, state: StoredState) -> None:
        self._check_open()
        await asyncio.to_thread(self._save_sync, state)

    async def delete(self) -> None:
        self._check_open()
        await asyncio.to_thread(remove, self._path)

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """Exclusive across processes, other FileStores and other tasks; not re-entrant.

        Each call opens its own descriptor on `<path>.lock`, and `flock` locks belong to
        the open file description, so a task that already holds the lock and asks again
        waits for itself until LockTimeout. The token manager holds it only around a
        refresh (re-read, refresh, save), never around other calls that lock.
        """
        self._check_open()
        return self._locked(timeout)

    async def verify(self) -> None:
        self._check_open()
        await asyncio.to_thread(self._verify_sync)

    async def close(self) -> None:
        self._closed = True
        if self._owner:
            self._backend.closed = True

    def _check_open(self) -> None:
        if self._closed or self._backend.closed:
            raise StoreError(f"token store {self._path} is closed")

    # Blocking halves, run in a worker thread.

    def reseal_sync(self, key: bytes) -> None:
        """Re-seal the stored state (if any) under `key`. Blocking; the caller holds the lock."""
        state = self._load_sync()
        if state is not None:
            write_atomic(self._path, seal(state_to_json(state), key, name=self._name))

    def _load_sync(self) -> StoredState | None:
        blob = _read(self._path)
        if blob is None:
            return None
        what = f"token file {self._path}"
        # The envelope first: a foreign file is reported as such, not as a missing key.
        check_envelope(blob, what=what)
        # An old-format (PLEOPX1) file opens too; the next write seals it as PLEOPX2.
        keys = self._backend.keys(create=False)
        plaintext = open_sealed(blob, keys, name=self._name, what=what)
        try:
            return state_from_json(plaintext)
        except ValueError as exc:
            # ValueError's text names the kind of problem only, never the content.
            raise StoreError(f"token file {self._path} is corrupt ({exc})") from None

    def _save_sync(self, state: StoredState) -> None:
        key = self._backend.keys(create=True)[0]
        write_atomic(self._path, seal(state_to_json(state), key, name=self._name))

    def _verify_sync(self) -> None:
        check_writable(self._path.parent)
        self._backend.keys(create=True)
        self._load_sync()

    # The lock.

    @asynccontextmanager
    async def _locked(self, wait: float) -> AsyncIterator[None]:
        # Opening the lock file is a local, non-blocking call; done inline because a
        # descriptor opened in a worker thread would leak if the awaiting task were
        # cancelled meanwhile.
        fd = self._open_lock_file()
        try:
            try:
                async with asyncio.timeout(wait):
                    await self._acquire(fd)
            except TimeoutError:
                raise LockTimeout(
                    f"token file {self._path} stayed locked for {wait:g}s"
                    f" (lock file {self._lock_path})"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _open_lock_file(self) -> int:
        try:
            ensure_dir(self._lock_path.parent)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {self._lock_path}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise StoreError(f"lock file {self._lock_path} must be mode 0600") from None
        return fd

    async def _acquire(self, fd: int) -> None:
        """Poll a non-blocking flock until it is had (the caller bounds the wait)."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot lock {self._lock_path}: {exc.strerror}") from None
            # Jitter so that waiters do not poll in step; not security-relevant.
            await asyncio.sleep(random.uniform(LOCK_POLL_MIN, LOCK_POLL_MAX))  # noqa: S311


def old_key_path(key_file: Path) -> Path:
    """Where the previous key is kept while a rotation re-seals the token files."""
    return key_file.with_name(f"{key_file.name}.old")


def ensure_dir(directory: Path) -> None:
    """Create the state directory (0700) if it is missing. Raises OSError."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        return
    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask: be exact


def check_writable(directory: Path) -> None:
    """Create `directory` if missing and write a probe file there; StoreError if that fails."""
    probe = directory / f".{secrets.token_hex(6)}.probe"
    try:
        ensure_dir(directory)
        write_private(probe, b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"token directory {directory} is not writable: {_reason(exc)}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600) so that readers see old or new, never a mix.

    Temp file in the same directory → fsync → rename over → fsync the directory. On any
    failure (read-only directory, disk full) the temp file is removed and the old file
    is left as it was.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        ensure_dir(path.parent)
        write_private(temp, data)
        try:
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {_reason(exc)}") from None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read token file {path}: {_reason(exc)}") from None


def remove(path: Path) -> None:
    """Unlink `path` and make that durable; no error if it is absent."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {_reason(exc)}") from None
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise StoreError(f"cannot sync directory {path.parent}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
