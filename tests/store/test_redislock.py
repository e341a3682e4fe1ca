"""Fenced writes in Redis: a holder whose lease lapsed, or whose entry changed since it read
it, writes nothing; writes outside a lock bump the version; a retried write is idempotent;
the lock's value names its holder. Against a real redis-server, a real frozen process."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from proxy.errors import FencedOut, LockTimeout
from proxy.store.redis import RedisStore, entry_keys
from proxy.store.redislock import Fence, lease_for
from tests.redis_server import redis_url  # noqa: F401
from tests.store.contract import sample_state

PREFIX = "pleo-proxy:test:"
T = TypeVar("T")
CHILD_TIMEOUT = 30.0


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def make_store(url: str, tmp_path: Path, *, lock_ttl: float = 45.0) -> RedisStore:
    key = b"k" * 32
    return RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", key=key, lock_ttl=lock_ttl)


async def elsewhere(awaitable: Coroutine[Any, Any, T]) -> T:
    """Run `awaitable` as another holder would: in a task with an empty context, no lease."""
    return await asyncio.create_task(awaitable, context=contextvars.Context())


async def text(raw: aioredis.Redis, key: str) -> str:
    value = await raw.get(key)
    assert isinstance(value, bytes)
    return value.decode()


async def version(raw: aioredis.Redis, key: str = f"{PREFIX}version") -> int:
    return int(await raw.get(key) or 0)


async def test_writes_outside_a_lock_are_not_checked_but_bump_the_version(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    store = make_store(redis_url, tmp_path)
    try:
        await store.save(sample_state(5))
        await store.save(sample_state(1))  # an older generation: the store does not judge
        await store.delete()
        assert await version(raw) == 3
        await store.delete()  # absent: still a write
        assert await version(raw) == 4
    finally:
        await store.close()


async def test_a_write_after_the_entry_changed_behind_the_holder_is_refused(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    holder, other = make_store(redis_url, tmp_path), make_store(redis_url, tmp_path)
    try:
        await holder.save(sample_state(1))
        async with holder.lock(1.0):
            assert await holder.load() == sample_state(1)
            await elsewhere(other.save(sample_state(2, marker="imported")))  # an import
            with pytest.raises(FencedOut) as caught:
                await holder.save(sample_state(3))
            with pytest.raises(FencedOut):
                await holder.delete()
            # Once it has read what is there, it may write again.
            assert await holder.load() == sample_state(2, marker="imported")
            await holder.save(sample_state(4))
        assert await other.load() == sample_state(4)
    finally:
        await holder.close()
        await other.close()
    assert caught.value.code == "lock_lost"
    assert "changed since it was read (version 1, now 2)" in caught.value.detail
    assert "ACCESS-TOKEN" not in caught.value.detail


async def test_the_version_is_taken_with_the_lock_for_writes_made_without_a_read(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    holder, other = make_store(redis_url, tmp_path), make_store(redis_url, tmp_path)
    try:
        await other.save(sample_state(1))
        async with holder.lock(1.0):
            await elsewhere(other.delete())  # after the lock was had, before any read
            with pytest.raises(FencedOut):
                await holder.save(sample_state(2))
        assert await other.load() is None
    finally:
        await holder.close()
        await other.close()


async def test_a_lease_fences_every_handle_of_its_entry_in_the_holding_task_only(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    holder, handle = make_store(redis_url, tmp_path), make_store(redis_url, tmp_path)
    go = asyncio.Event()

    async def outsider() -> None:
        await go.wait()
        await handle.save(sample_state(1, marker="outside"))

    # Started before the lock was taken: its context holds no lease, its write is unfenced.
    task = asyncio.create_task(outsider())
    try:
        async with holder.lock(1.0):
            assert lease_for(holder.lock_key) is not None
            await holder.load()
            go.set()
            await task
            # This task's lease fences every handle of the entry, and the handles share
            # what the holder has seen.
            with pytest.raises(FencedOut):
                await handle.save(sample_state(2))
            await handle.load()
            await holder.save(sample_state(3))
        assert lease_for(holder.lock_key) is None
        assert await handle.load() == sample_state(3)
    finally:
        await holder.close()
        await handle.close()


async def test_a_retried_write_finds_its_own_result_and_succeeds(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    store = make_store(redis_url, tmp_path)
    fence = Fence(raw)
    try:
        async with store.lock(1.0):
            await store.load()
            lease = lease_for(store.lock_key)
            assert lease is not None
            seen = lease.version
            keys = entry_keys(PREFIX, "default")
            await fence.write(keys, b"value-one", what="state")
            # What redis-py does when the reply was lost: the same script, the same args.
            lease.version = seen
            await fence.write(keys, b"value-one", what="state")
            assert await version(raw) == seen + 1  # written once
            lease.version = seen
            with pytest.raises(FencedOut):
                await fence.write(keys, b"value-two", what="state")
    finally:
        await store.close()


async def test_the_lock_value_names_its_holder(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    store = make_store(redis_url, tmp_path)
    try:
        async with store.lock(1.0):
            value = await text(raw, store.lock_key)
        async with store.lock(1.0):
            again = await text(raw, store.lock_key)
    finally:
        await store.close()
    host, pid, nonce = value.rsplit(":", 2)
    assert (host, int(pid)) == (socket.gethostname(), os.getpid())
    assert len(nonce) == 16
    assert again != value  # a fresh id per holding


FROZEN_HOLDER = """
import asyncio, sys
from proxy.errors import FencedOut
from tests.store.contract import sample_state

async def _run():
    store = await make_store()
    try:
        async with store.lock(10.0):
            await store.load()
            print("locked", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            for write in (lambda: store.save(sample_state(1, marker="stale")), store.delete):
                try:
                    await write()
                    print("written", flush=True)
                except FencedOut as exc:
                    print(exc.code, flush=True)
    finally:
        await store.close()

asyncio.run(_run())
"""


async def test_a_holder_frozen_past_its_lease_cannot_overwrite_newer_tokens(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    ttl = 0.6
    setup = (
        "from pathlib import Path\n"
        "from proxy.store.redis import RedisStore\n"
        "async def make_store():\n"
        f"    return RedisStore({redis_url!r}, prefix={PREFIX!r}, key_file=Path('/nonexistent'),"
        f" key={b'k' * 32!r}, lock_ttl={ttl!r})\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        setup + FROZEN_HOLDER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    other = make_store(redis_url, tmp_path, lock_ttl=ttl)
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT) == b"locked\n"
        child.send_signal(signal.SIGSTOP)
        with pytest.raises(LockTimeout):
            async with other.lock(0.1):
                pytest.fail("took a lock a live process holds")
        # Frozen, it cannot extend: the lease lapses and another holder writes.
        async with other.lock(ttl * 4):
            await other.load()
            await other.save(sample_state(2, marker="newer"))
        child.send_signal(signal.SIGCONT)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        answers = [await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT) for _ in "ab"]
        assert await other.load() == sample_state(2, marker="newer")
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
        await child.wait()
        await other.close()
    assert answers == [b"lock_lost\n", b"lock_lost\n"]
