"""The one Redis client that every connection's store shares, and the one error boundary.

Owns connecting (timeouts, retries), the sealing key of values in Redis, and the mapping
of redis-py errors to StoreError (`RedisBackend.mapped`: nothing else catches them).
Must not know the key layout or the lock protocol (redis.py), touch files other than the
key file, or put a value, a token or a Redis password in a message.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from proxy.errors import StoreError
from proxy.store.crypto import check_envelope, load_key, open_sealed
from proxy.tokenset import StoredState, state_from_json

if TYPE_CHECKING:
    from proxy.config import Config

WHAT = "token state in Redis"
# The lock must outlive the longest refresh (one token request, two saves) so that it is
# never lost while held; it is extended every third of it anyway, and a crashed holder's
# lock expires by itself after at most this long.
LOCK_MARGIN = 30.0
DEFAULT_LOCK_TTL = 15.0 + LOCK_MARGIN
DEFAULT_TIMEOUT = 5.0
PROBE_TTL_MS = 60_000
# redis-py's default retries ten times (seconds against a Redis that is down); two quick
# retries ride over a reconnect without making an outage slow to report.
RETRIES = 2


def redis_url(config: Config) -> str:
    """`tokens.redis_url`, which the redis store requires."""
    url = config.tokens.redis_url
    if url is None:
        raise StoreError("tokens.redis_url: required when tokens.store is redis")
    return url


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


class RedisBackend:
    """One Redis client and the sealing key, shared by every connection's store.

    `key` is the sealing key when given; otherwise it is resolved by `load_key`
    (PLEO_PROXY_KEY, systemd credential, `key_file`) on first use and kept.
    """

    def __init__(
        self,
        url: str,
        *,
        key_file: Path,
        key: bytes | None = None,
        environ: Mapping[str, str] | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.display = display_url(url)
        self.lock_ttl = lock_ttl
        self.closed = False
        self._secrets = _passwords(url)
        self._key = key
        self._key_file = key_file
        self._environ = environ
        self.client = self._connect(url, timeout)

    @classmethod
    def from_config(
        cls, config: Config, *, environ: Mapping[str, str] | None = None
    ) -> RedisBackend:
        return cls(
            redis_url(config),
            key_file=config.tokens.key_file,
            environ=environ,
            lock_ttl=config.timeouts.token_request + LOCK_MARGIN,
            timeout=config.timeouts.connect,
        )

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
            raise StoreError(f"tokens.redis_url {self.display} is not usable: {reason}") from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.client.aclose()

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(key)
        # The client is made without decode_responses: values come back as bytes.
        return value.encode() if isinstance(value, str) else value

    async def check(self, probe_prefix: str, sample: Callable[[], Awaitable[object]]) -> None:
        """Start-up check: PING, write a probe, and `sample()` (read and open one entry);
        when that finds nothing (None), resolve the key, creating it if it is missing."""
        with self.mapped("answer PING"):
            await self.client.ping()
        probe = f"{probe_prefix}{secrets.token_hex(6)}"
        with self.mapped("write a probe key"):
            await self.client.set(probe, b"", px=PROBE_TTL_MS)
            await self.client.delete(probe)
        if await sample() is None:
            await self.resolve_key(create=True)

    # Keys and sealing.

    async def resolve_key(self, *, create: bool) -> bytes:
        if self._key is None:
            environ = os.environ if self._environ is None else self._environ
            self._key = await asyncio.to_thread(
                load_key, self._key_file, environ=environ, create=create
            )
        return self._key

    async def open(self, blob: bytes, *, name: str, what: str = WHAT) -> StoredState:
        """The state sealed in `blob` as connection `name`'s; `what` names it in messages
        (and names no secret). An old-format (PLEOPX1) blob opens too: it binds no name."""
        # The envelope first: a foreign value is reported as such, not as a missing key.
        check_envelope(blob, what=what)
        keys = [await self.resolve_key(create=False)]
        plaintext = open_sealed(blob, keys, name=name, what=what)
        try:
            return state_from_json(plaintext)
        except ValueError as exc:
            # ValueError's text names the kind of problem only, never the content.
            raise StoreError(f"{what} is corrupt ({exc})") from None

    # The one place redis-py's exceptions become ours.

    @contextmanager
    def mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            reason = self._reason(exc)
            raise StoreError(f"cannot reach Redis at {self.display}: {reason}") from None
        except redis.exceptions.RedisError as exc:
            reason = self._reason(exc)
            raise StoreError(f"Redis at {self.display} refused to {action}: {reason}") from None

    def _reason(self, exc: BaseException) -> str:
        return self._scrub(str(exc).strip() or type(exc).__name__)

    def _scrub(self, text: str) -> str:
        # redis-py's messages name hosts, not passwords; this is the belt to those braces.
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text[:300]
