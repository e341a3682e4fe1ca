"""Token state in Redis, shared by several proxy instances, and the distributed refresh lock.

Owns the key layout (`pleo-proxy:<connection id>:state|lock|probe:*`), the lock protocol
and the mapping of redis-py errors to StoreError (in `_mapped`, the one boundary). Must not
decide when to refresh, touch files other than the key file, or put a value, a token or a
Redis password in a message.

Operating it. Every instance must use the same key: set PLEO_PROXY_KEY (or the systemd
credential) to the same value everywhere, or copy one key file to all of them; a value
sealed under another key is a StoreError naming both key ids. `save()` returns when Redis
has acknowledged the SET; whether that reply means "on disk" is Redis's persistence
setting. For the design's "persisted before used" rule run Redis with `appendonly yes` and
`appendfsync always` (Redis then fsyncs the AOF before it replies); without persistence a
Redis restart loses the tokens and the connection must be authorised again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from proxy.errors import LockTimeout, StoreError
from proxy.store.crypto import check_envelope, load_key, open_sealed, seal
from proxy.tokenset import StoredState, state_from_json, state_to_json

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger(__name__)

WHAT = "token state in Redis"
# The lock must outlive the longest refresh (one token request, two saves) so that it is
# never lost while held; it is extended every third of it anyway, and a crashed holder's
# lock expires by itself after at most this long.
LOCK_MARGIN = 30.0
DEFAULT_LOCK_TTL = 15.0 + LOCK_MARGIN
DEFAULT_TIMEOUT = 5.0
LOCK_POLL_MIN = 0.01
LOCK_POLL_MAX = 0.05
PROBE_TTL_MS = 60_000
# redis-py's default retries ten times (seconds against a Redis that is down); two quick
# retries ride over a reconnect without making an outage slow to report.
RETRIES = 2

# Compare-and-delete / compare-and-extend: only the holder (who knows the random token)
# may release or extend the lock, so a holder whose lock expired cannot free another's.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def key_prefix(client_id: str | None, api_url: str) -> str:
    """The key prefix of one Pleo connection, so several connections can share one Redis."""
    digest = hashlib.sha256(f"{client_id or ''}\n{api_url}".encode()).hexdigest()[:16]
    return f"pleo-proxy:{digest}:"


def display_url(url: str) -> str:
    """`url` fit for a message: no user, no password, no query (redis-py reads one there)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", [])
        return f"unix://{parts.path}" + (f"?db={db[0]}" if db else "")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.scheme}://{host}:{port}/{parts.path.lstrip('/') or '0'}"


def _passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    return found + parse_qs(parts.query).get("password", [])


class RedisStore:
    """The `TokenStore` kept in one Redis value, sealed like the token file.

    `key` is the sealing key when given; otherwise it is resolved by `load_key`
    (PLEO_PROXY_KEY, systemd credential, `key_file`) on first use and kept.
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
        self._url = url
        self._display = display_url(url)
        self._secrets = _passwords(url)
        self._state_key = f"{prefix}state"
        self._lock_key = f"{prefix}lock"
        self._probe_prefix = f"{prefix}probe:"
        self._key = key
        self._key_file = key_file
        self._environ = environ
        self._lock_ttl = lock_ttl
        self._closed = False
        self._client = self._connect(url, timeout)
        self._release = self._client.register_script(RELEASE_SCRIPT)
        self._extend = self._client.register_script(EXTEND_SCRIPT)

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        url = config.tokens.redis_url
        if url is None:
            raise StoreError("tokens.redis_url: required when tokens.store is redis")
        return cls(
            url,
            prefix=key_prefix(config.pleo.client_id, config.pleo.api_url),
            key_file=config.tokens.key_file,
            lock_ttl=config.timeouts.token_request + LOCK_MARGIN,
            timeout=config.timeouts.connect,
        )

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def lock_key(self) -> str:
        return self._lock_key

    def _connect(self, url: str, timeout: float) -> aioredis.Redis:
        try:
            return aioredis.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES),
            )
        except ValueError as exc:
            reason = self._scrub(str(exc))
            raise StoreError(f"tokens.redis_url {self._display} is not usable: {reason}") from None

    async def load(self) -> StoredState | None:
        self._check_open()
        with self._mapped("read the token state"):
            blob = await self._get(self._state_key)
        if blob is None:
            return None
        return await self._open(blob)

    async def save(self, state: StoredState) -> None:
        self._check_open()
        blob = seal(state_to_json(state), await self._resolve_key(create=True))
        # One SET is atomic; its reply is Redis's acknowledgement (see the module docstring
        # for what that means on disk).
        with self._mapped("save the token state"):
            await self._client.set(self._state_key, blob)

    async def delete(self) -> None:
        self._check_open()
        with self._mapped("delete the token state"):
            await self._client.delete(self._state_key)

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """Exclusive across hosts, processes and tasks (a fresh token per call); not re-entrant.

        LockTimeout when the lock stayed held for `timeout` seconds; StoreError when Redis
        cannot be reached. While held, the lock's TTL is renewed every third of it.
        """
        self._check_open()
        return self._locked(timeout)

    async def verify(self) -> None:
        self._check_open()
        with self._mapped("answer PING"):
            await self._client.ping()
        probe = f"{self._probe_prefix}{secrets.token_hex(6)}"
        with self._mapped("write a probe key"):
            await self._client.set(probe, b"", px=PROBE_TTL_MS)
            await self._client.delete(probe)
        with self._mapped("read the token state"):
            blob = await self._get(self._state_key)
        if blob is None:
            await self._resolve_key(create=True)
        else:
            await self._open(blob)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()

    async def _get(self, key: str) -> bytes | None:
        value = await self._client.get(key)
        # The client is made without decode_responses: values come back as bytes.
        return value.encode() if isinstance(value, str) else value

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"token store {self._display} is closed")

    # Keys and sealing.

    async def _resolve_key(self, *, create: bool) -> bytes:
        if self._key is None:
            environ = os.environ if self._environ is None else self._environ
            self._key = await asyncio.to_thread(
                load_key, self._key_file, environ=environ, create=create
            )
        return self._key

    async def _open(self, blob: bytes) -> StoredState:
        # The envelope first: a foreign value is reported as such, not as a missing key.
        check_envelope(blob, what=WHAT)
        plaintext = open_sealed(blob, [await self._resolve_key(create=False)], what=WHAT)
        try:
            return state_from_json(plaintext)
        except ValueError as exc:
            # ValueError's text names the kind of problem only, never the content.
            raise StoreError(f"{WHAT} is corrupt ({exc})") from None

    # The lock.

    @asynccontextmanager
    async def _locked(self, wait: float) -> AsyncIterator[None]:
        token = secrets.token_hex(16)
        await self._acquire(token, wait)
        extender = asyncio.create_task(self._keep_extending(token), name="redis-lock-extend")
        try:
            yield
        finally:
            extender.cancel()
            await asyncio.gather(extender, return_exceptions=True)
            # Shielded: a second cancellation must not leave the lock to its TTL.
            await asyncio.shield(self._release_quietly(token))

    async def _acquire(self, token: str, wait: float) -> None:
        """Poll SET NX with jittered sleeps until the lock is had or `wait` has passed."""
        deadline = time.monotonic() + wait
        try:
            while not await self._try_lock(token):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(
                        f"the refresh lock {self._lock_key} in Redis at {self._display}"
                        f" stayed held for {wait:g}s"
                    )
                # Jitter so that waiters do not poll in step; not security-relevant.
                pause = random.uniform(LOCK_POLL_MIN, LOCK_POLL_MAX)  # noqa: S311
                await asyncio.sleep(min(remaining, pause))
        except asyncio.CancelledError:
            # The SET may have reached Redis before the cancellation: take our token back
            # rather than leave a lock nobody holds until its TTL ends.
            await asyncio.shield(self._release_quietly(token))
            raise

    async def _try_lock(self, token: str) -> bool:
        with self._mapped("take the refresh lock"):
            ttl_ms = int(self._lock_ttl * 1000)
            if await self._client.set(self._lock_key, token, nx=True, px=ttl_ms):
                return True
            # A SET retried after a lost reply finds our own token: that is the lock, had.
            return await self._get(self._lock_key) == token.encode()

    async def _keep_extending(self, token: str) -> None:
        """Renew the lock's TTL every third of it, so a slow refresh never loses it."""
        ttl_ms = int(self._lock_ttl * 1000)
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            try:
                with self._mapped("extend the refresh lock"):
                    extended = await self._extend(keys=[self._lock_key], args=[token, ttl_ms])
            except StoreError as exc:
                # Try again at the next tick: the TTL leaves two more chances.
                log.warning("could not extend the refresh lock: %s", exc.detail)
                continue
            if not extended:
                log.error(
                    "the refresh lock %s expired while held; another instance may refresh too",
                    self._lock_key,
                )
                return

    async def _release_quietly(self, token: str) -> None:
        """Compare-and-delete; failures are logged, as the lock expires by its TTL anyway."""
        try:
            with self._mapped("release the refresh lock"):
                released = await self._release(keys=[self._lock_key], args=[token])
        except StoreError as exc:
            log.warning("could not release the refresh lock (it will expire): %s", exc.detail)
            return
        if not released:
            log.debug("the refresh lock %s was not ours to release", self._lock_key)

    # The one place redis-py's exceptions become ours.

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            reason = self._reason(exc)
            raise StoreError(f"cannot reach Redis at {self._display}: {reason}") from None
        except redis.exceptions.RedisError as exc:
            reason = self._reason(exc)
            raise StoreError(f"Redis at {self._display} refused to {action}: {reason}") from None

    def _reason(self, exc: BaseException) -> str:
        return self._scrub(str(exc).strip() or type(exc).__name__)

    def _scrub(self, text: str) -> str:
        # redis-py's messages name hosts, not passwords; this is the belt to those braces.
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text[:300]
