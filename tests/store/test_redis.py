"""RedisStore: the store contract against a real redis-server, plus the distributed lock's
TTL and extension, keys shared by instances, no plaintext at rest, and unreachable Redis."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.config import Config, Pleo, Timeouts, TokensConfig
from proxy.errors import LockTimeout, StoreError
from proxy.store import open_store
from proxy.store.crypto import generate_key, key_id
from proxy.store.redis import RedisStore, display_url, key_prefix
from tests.processes import free_port
from tests.redis_server import redis_url, running_redis  # noqa: F401
from tests.store.contract import CHECKS, Check, Harness, check_id, sample_state

CHILD_TIMEOUT = 30.0
PREFIX = "pleo-proxy:test:"


@dataclass(frozen=True)
class Location:
    url: str
    key_file: Path

    def store(self, *, key: bytes | None = None, lock_ttl: float = 45.0) -> RedisStore:
        return RedisStore(
            self.url, prefix=PREFIX, key_file=self.key_file, key=key, environ={}, lock_ttl=lock_ttl
        )

    def child_setup(self, *, lock_ttl: float = 45.0) -> str:
        # An empty environment mapping: a PLEO_PROXY_KEY in the runner's cannot interfere.
        return (
            "from pathlib import Path\n"
            "from proxy.store.redis import RedisStore\n"
            "async def make_store():\n"
            f"    return RedisStore({self.url!r}, prefix={PREFIX!r},"
            f" key_file=Path({str(self.key_file)!r}), environ={{}}, lock_ttl={lock_ttl!r})\n"
        )


@pytest.fixture
def location(redis_url: str, tmp_path: Path) -> Location:  # noqa: F811
    return Location(redis_url, tmp_path / "state" / "tokens.key")


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    """A plain client on the same Redis, to see what is at rest."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def harness(location: Location, raw: aioredis.Redis) -> Harness:
    async def make_store() -> RedisStore:
        return location.store()

    async def raw_bytes() -> bytes | None:
        value = await raw.get(f"{PREFIX}state")
        return value.encode() if isinstance(value, str) else value

    async def write_raw(data: bytes) -> None:
        await raw.set(f"{PREFIX}state", data)

    return Harness(make_store, raw_bytes, write_raw, location.child_setup())


@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_contract(check: Check, harness: Harness) -> None:
    await asyncio.wait_for(check(harness), 90.0)


HOLD_UNTIL_KILLED = """
import asyncio

async def _hold():
    store = await make_store()
    async with store.lock(10.0):
        print("locked", flush=True)
        await asyncio.sleep(3600)

asyncio.run(_hold())
"""


async def test_lock_of_a_killed_holder_expires_after_its_ttl(location: Location) -> None:
    ttl = 1.5
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        location.child_setup(lock_ttl=ttl) + HOLD_UNTIL_KILLED,
        stdout=asyncio.subprocess.PIPE,
    )
    store = location.store()
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
        assert line == b"locked\n"
        with pytest.raises(LockTimeout):
            async with store.lock(0.2):
                pytest.fail("took a lock a live process holds")
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), CHILD_TIMEOUT)
        started = time.monotonic()
        async with store.lock(10.0):
            waited = time.monotonic() - started
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await store.close()
    # Nobody released it: it was had only once its TTL (extended at most ttl/3 ago) ran out.
    assert ttl / 3 <= waited <= ttl + 2.0


async def test_lock_is_extended_while_held(location: Location, raw: aioredis.Redis) -> None:
    ttl = 0.6
    holder, other = location.store(lock_ttl=ttl), location.store(lock_ttl=ttl)
    try:
        async with holder.lock(1.0):
            # Held for more than five TTLs: without renewal `other` would get it after one.
            deadline = time.monotonic() + 5 * ttl
            while time.monotonic() < deadline:
                with pytest.raises(LockTimeout):
                    async with other.lock(0.0):
                        pytest.fail("the lock expired while held")
                assert 0 < await raw.pttl(f"{PREFIX}lock") <= ttl * 1000
                await asyncio.sleep(0.1)
        assert await raw.exists(f"{PREFIX}lock") == 0
        async with other.lock(0.5):
            pass
    finally:
        await holder.close()
        await other.close()


async def test_lock_ttl_comes_from_the_token_request_timeout(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    config = _config(redis_url, tmp_path, client_id="ttl-client")
    config = replace(config, timeouts=Timeouts(token_request=7.0))
    store = open_store(config)
    assert isinstance(store, RedisStore)
    try:
        async with store.lock(1.0):
            remaining = await raw.pttl(store.lock_key)
        assert 36_000 < remaining <= 37_000  # token_request + 30 s
    finally:
        await store.close()


async def test_foreign_key_is_error_naming_both_key_ids(location: Location) -> None:
    sealer, other = generate_key(), generate_key()
    writer, reader = location.store(key=sealer), location.store(key=other)
    try:
        await writer.save(sample_state(1))
        for action in (reader.load, reader.verify):
            with pytest.raises(StoreError) as caught:
                await action()
            assert key_id(sealer) in caught.value.detail
            assert key_id(other) in caught.value.detail
            assert "token state in Redis" in caught.value.detail
        assert await writer.load() == sample_state(1)  # left as it was
    finally:
        await writer.close()
        await reader.close()


async def test_missing_key_with_a_stored_value_is_error_and_no_key_is_made(
    location: Location,
) -> None:
    writer = location.store(key=generate_key())
    reader = location.store()
    try:
        await writer.save(sample_state(1))
        with pytest.raises(StoreError, match="does not exist"):
            await reader.verify()
        assert not location.key_file.exists()
    finally:
        await writer.close()
        await reader.close()


async def test_instances_share_a_key_from_the_environment(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    environ = {"PLEO_PROXY_KEY": base64.b64encode(generate_key()).decode()}
    first = RedisStore(redis_url, prefix=PREFIX, key_file=tmp_path / "a" / "k", environ=environ)
    second = RedisStore(redis_url, prefix=PREFIX, key_file=tmp_path / "b" / "k", environ=environ)
    try:
        await first.verify()
        await first.save(sample_state(3))
        await second.verify()
        assert await second.load() == sample_state(3)
    finally:
        await first.close()
        await second.close()
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def _config(url: str, tmp_path: Path, *, client_id: str) -> Config:
    return Config(
        pleo=Pleo(client_id=client_id, api_url="https://external.pleo.io"),
        tokens=TokensConfig(
            store="redis",
            redis_url=url,
            path=tmp_path / "tokens.enc",
            key_file=tmp_path / "tokens.key",
        ),
    )


async def test_nothing_readable_at_rest_and_connections_are_kept_apart(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    raw: aioredis.Redis,
) -> None:
    one = open_store(_config(redis_url, tmp_path, client_id="client-one"))
    two = open_store(_config(redis_url, tmp_path, client_id="client-two"))
    state = sample_state(9, marker="atrest")
    try:
        await one.verify()  # its probe key is gone again
        await one.save(state)
        async with one.lock(1.0):
            keys = sorted(k if isinstance(k, str) else k.decode() for k in await raw.keys("*"))
            values = [await raw.get(k) for k in keys]
        assert await two.load() is None  # another client id: another connection
        assert await one.load() == state
    finally:
        await one.close()
        await two.close()
    prefix = key_prefix("client-one", "https://external.pleo.io")
    assert keys == [f"{prefix}lock", f"{prefix}state"]
    assert state.tokens is not None
    assert state.tokens.refresh_token is not None
    secrets = (state.tokens.access_token.reveal(), state.tokens.refresh_token.reveal())
    for value in values:
        assert value is not None
        for text in (*secrets, "ACCESS-TOKEN", "REFRESH-TOKEN", "Example ApS", "atrest"):
            assert text.encode() not in value
    assert not (tmp_path / "tokens.enc").exists()  # Redis only: no token file


async def test_unreachable_redis_is_error_with_the_url_but_no_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://operator:hunter2-pass@127.0.0.1:{port}/3"
    store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={}, timeout=2.0)
    expected = f"cannot reach Redis at redis://127.0.0.1:{port}/3: "
    started = time.monotonic()
    try:
        for action in (store.verify, store.load, store.delete, _lock_once(store)):
            with pytest.raises(StoreError) as caught:
                await action()
            assert not isinstance(caught.value, LockTimeout)
            assert caught.value.detail.startswith(expected), caught.value.detail
            assert "hunter2-pass" not in caught.value.detail
            assert "operator" not in caught.value.detail
        with pytest.raises(StoreError, match="cannot reach Redis"):
            await store.save(sample_state(1))
    finally:
        await store.close()
    assert time.monotonic() - started < 20.0  # reported, not retried for long


def _lock_once(store: RedisStore) -> Callable[[], Awaitable[None]]:
    async def take() -> None:
        async with store.lock(5.0):
            pytest.fail("took a lock on a Redis that is not there")

    return take


async def test_wrong_password_is_error_without_the_password(tmp_path: Path) -> None:
    with running_redis("--requirepass", "right-password", password="right-password") as server:
        url = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={})
        try:
            with pytest.raises(StoreError) as caught:
                await store.verify()
        finally:
            await store.close()
        good = RedisStore(
            f"redis://:right-password@127.0.0.1:{server.port}/0",
            prefix=PREFIX,
            key_file=tmp_path / "k",
            environ={},
        )
        try:
            await good.verify()
            await good.save(sample_state(2))
            assert await good.load() == sample_state(2)
        finally:
            await good.close()
    assert f"redis://127.0.0.1:{server.port}/0" in caught.value.detail
    assert "password" not in caught.value.detail.replace("username-password", "")
    assert "wrong-password" not in caught.value.detail


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p@db.example:6380/2", "redis://db.example:6380/2"),
        ("rediss://:p@[::1]/0", "rediss://[::1]:6379/0"),
        ("redis://localhost", "redis://localhost:6379/0"),
        ("unix:///run/redis.sock?db=1&password=p", "unix:///run/redis.sock?db=1"),
    ],
)
def test_display_url_drops_credentials(url: str, shown: str) -> None:
    assert display_url(url) == shown


async def test_closed_store_refuses_use(location: Location) -> None:
    store = location.store()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.load()
    with pytest.raises(StoreError, match="closed"):
        store.lock(1.0)
