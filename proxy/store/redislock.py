"""The Redis refresh lock and fenced writes: leases, and the scripts that check them.

Owns the lock protocol (`SET NX PX` with the holder's id, compare-and-extend,
compare-and-delete), the lease a task holds inside a lock, and the one Lua script every
change of an entry goes through. Must not know the key layout (redis.py), catch
redis-py's exceptions (redisclient.py maps them), or put a value or a token in a message.

Fencing. Each entry has a version key that every write increments, in the same script
as the write and its index update. A write by a lease holder happens only if the lock
still holds the holder's id and the version is the one the holder last read or wrote;
otherwise nothing is written and the writer gets FencedOut. Lock and data live in the
same Redis and the script runs atomically there, so the check and the write cannot be
separated: a holder whose lease lapsed (frozen, paused, cut off) cannot overwrite what
was written after it. Writes outside a lock (an import, a logout from the CLI) are not
checked but bump the version too, which fences out any holder that read before them.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import redis.asyncio as aioredis

from proxy.errors import FencedOut

# KEYS: lock, version. ARGV: holder id, TTL in ms. The entry's version when the lock is
# had (a SET retried after a lost reply finds our own id: that is the lock, had), else -1.
ACQUIRE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
    or redis.call('GET', KEYS[1]) == ARGV[1] then
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return -1
"""
# Compare-and-extend / compare-and-delete: only the holder may extend or release.
EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: state, version, lock, index, change counter.
# ARGV: 'set' or 'del', value, holder id ('' = no lease), expected version ('' = any),
#       index member ('' = not indexed), '1' to increment the change counter.
# Returns {'ok', new version} or {'lock_lost' | 'moved', current version}.
WRITE_SCRIPT = """
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
local refusal = nil
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  refusal = 'lock_lost'
elseif ARGV[4] ~= '' and version ~= tonumber(ARGV[4]) then
  refusal = 'moved'
end
if refusal then
  -- A write retried after its reply was lost finds its own result one version on.
  if ARGV[4] ~= '' and version == tonumber(ARGV[4]) + 1 then
    local value = redis.call('GET', KEYS[1])
    if (ARGV[1] == 'set' and value == ARGV[2]) or (ARGV[1] == 'del' and not value) then
      return {'ok', version}
    end
  end
  return {refusal, version}
end
if ARGV[1] == 'set' then
  redis.call('SET', KEYS[1], ARGV[2])
  if ARGV[5] ~= '' then redis.call('SADD', KEYS[4], ARGV[5]) end
else
  redis.call('DEL', KEYS[1])
  if ARGV[5] ~= '' then redis.call('SREM', KEYS[4], ARGV[5]) end
end
if ARGV[6] == '1' then redis.call('INCR', KEYS[5]) end
return {'ok', redis.call('INCR', KEYS[2])}
"""


def holder_id() -> str:
    """A lock value naming its holder: host, process and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


@dataclass
class Lease:
    """One holding of one entry's lock: the holder's id and the version it last saw."""

    lock_key: str
    holder: str
    version: int


# The leases the current task holds (a task inside `lock()`, and tasks it starts there).
# Keyed by lock key, not by store object: every handle on an entry sees its lease.
_LEASES: ContextVar[tuple[Lease, ...]] = ContextVar("pleo_proxy_redis_leases", default=())


def lease_for(lock_key: str) -> Lease | None:
    """The lease the current task holds on `lock_key`, if any."""
    return next((lease for lease in _LEASES.get() if lease.lock_key == lock_key), None)


@contextmanager
def holding(lease: Lease) -> Iterator[None]:
    """Make `lease` the current task's for the block: its writes are then fenced by it."""
    token = _LEASES.set((*_LEASES.get(), lease))
    try:
        yield
    finally:
        _LEASES.reset(token)


@dataclass(frozen=True)
class Entry:
    """The keys of one entry's write script (the layout is redis.py's)."""

    state: str
    version: str
    lock: str
    index: str
    member: str | None  # its name in the index set; None: not indexed (`default`)


class Fence:
    """The lock and write scripts, registered on one client (registration does no I/O)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._extend = client.register_script(EXTEND_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._write = client.register_script(WRITE_SCRIPT)

    async def acquire(self, entry: Entry, holder: str, ttl_ms: int) -> Lease | None:
        """The lease when the lock was free (or already ours), else None."""
        version = int(await self._acquire(keys=[entry.lock, entry.version], args=[holder, ttl_ms]))
        return None if version < 0 else Lease(entry.lock, holder, version)

    async def extend(self, entry: Entry, holder: str, ttl_ms: int) -> bool:
        return bool(await self._extend(keys=[entry.lock], args=[holder, ttl_ms]))

    async def release(self, entry: Entry, holder: str) -> bool:
        return bool(await self._release(keys=[entry.lock], args=[holder]))

    async def write(
        self, entry: Entry, value: bytes | None, *, counter: str | None = None, what: str
    ) -> None:
        """SET (`value`) or DEL (None) the entry, with its index and version, fenced by the
        current task's lease on it if there is one. FencedOut when refused."""
        lease = lease_for(entry.lock)
        args: list[bytes | str] = [
            "del" if value is None else "set",
            b"" if value is None else value,
            lease.holder if lease is not None else "",
            str(lease.version) if lease is not None else "",
            entry.member or "",
            "1" if counter is not None else "",
        ]
        keys = [entry.state, entry.version, entry.lock, entry.index, counter or entry.index]
        outcome, version = await self._write(keys=keys, args=args)
        if outcome == b"ok":
            if lease is not None:
                lease.version = int(version)
            return
        assert lease is not None  # noqa: S101 - only a lease holder's write is refused
        raise FencedOut(_refusal(outcome, entry, what, seen=lease.version, now=int(version)))


def _refusal(outcome: bytes, entry: Entry, what: str, *, seen: int, now: int) -> str:
    if outcome == b"lock_lost":
        return (
            f"the {what} was not written: the refresh lock {entry.lock} was lost"
            " (it expired, or another instance holds it now)"
        )
    return f"the {what} was not written: it changed since it was read (version {seen}, now {now})"
