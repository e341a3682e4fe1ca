"""RedisStore and RedisStores against a real redis-server: the store and connection-stores
contracts, the distributed lock's TTL and extension, keys shared by instances, the key
layout and index, one client for every connection, and no plaintext at rest.

Unreachable Redis and passwords in messages are test_redisclient.py's."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.config import Config, Pleo, Timeouts, TokensConfig
from proxy.errors import LockTimeout, StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store import open_store, open_stores
from proxy.store.crypto import generate_key, key_id
from proxy.store.redis import RedisStore, RedisStores, entry_keys, key_prefix
from proxy.store.redisclient import RedisBackend
from tests.redis_server import redis_url  # noqa: F401
from tests.store import names_contract
from tests.store.connections_contract import STORES_CHECKS, StoresCheck, StoresHarness
from tests.store.contract import CHECKS, Check, Harness, check_id, sample_state
from tests.store.names_contract import NAMES_CHECKS, EntriesHarness

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

    def stores(self) -> RedisStores:
        backend = RedisBackend(self.url, key_file=self.key_file, environ={})
        return RedisStores(backend, prefix=PREFIX)

    def child_setup(self, *, lock_ttl: float = 45.0) -> str:
        # An empty environment mapping: a PLEO_PROXY_KEY in the runner's cannot interfere.
        return (
            "from pathlib import Path\n"
            "from proxy.store.redis import RedisStore, RedisStores\n"
            "from proxy.store.redisclient import RedisBackend\n"
            "async def make_store():\n"
            f"    return RedisStore({self.url!r}, prefix={PREFIX!r},"
            f" key_file=Path({str(self.key_file)!r}), environ={{}}, lock_ttl={lock_ttl!r})\n"
            "async def make_stores():\n"
            f"    backend = RedisBackend({self.url!r}, key_file=Path({str(self.key_file)!r}),"
            f" environ={{}}, lock_ttl={lock_ttl!r})\n"
            f"    return RedisStores(backend, prefix={PREFIX!r})\n"
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


async def values_at_rest(raw: aioredis.Redis) -> list[bytes]:
    """Every value in the Redis: strings as they are, sets member by member."""
    values: list[bytes | str | None] = []
    async for key in raw.scan_iter():
        if await raw.type(key) == b"set":
            values += await raw.smembers(key)
        else:
            values.append(await raw.get(key))
    return [v.encode() if isinstance(v, str) else v for v in values if v is not None]


@pytest.fixture
def stores_harness(location: Location, raw: aioredis.Redis) -> StoresHarness:
    async def make_stores() -> RedisStores:
        return location.stores()

    async def make_legacy() -> RedisStore:
        return location.store()

    async def raw_values() -> list[bytes]:
        return await values_at_rest(raw)

    return StoresHarness(make_stores, make_legacy, raw_values, location.child_setup())


@pytest.mark.parametrize("check", STORES_CHECKS, ids=check_id)
async def test_connections_contract(check: StoresCheck, stores_harness: StoresHarness) -> None:
    await asyncio.wait_for(check(stores_harness), 90.0)


@pytest.fixture
def entries(location: Location, raw: aioredis.Redis) -> EntriesHarness:
    async def make_stores() -> RedisStores:
        return location.stores()

    async def make_legacy() -> RedisStore:
        return location.store()

    async def read_entry(name: str) -> bytes | None:
        value = await raw.get(entry_keys(PREFIX, name).state)
        return value.encode() if isinstance(value, str) else value

    async def write_entry(name: str, blob: bytes) -> None:
        await raw.set(entry_keys(PREFIX, name).state, blob)
        if name != DEFAULT_CONNECTION:
            await raw.sadd(f"{PREFIX}connections", name)

    # No rotate-key for Redis (the CLI refuses it), so no rotation check here.
    return EntriesHarness(make_stores, make_legacy, read_entry, write_entry, location.key_file)


@pytest.mark.parametrize("check", NAMES_CHECKS, ids=check_id)
async def test_names_contract(check: names_contract.Check, entries: EntriesHarness) -> None:
    await asyncio.wait_for(check(entries), 90.0)


async def raw_get(location: Location, key: str) -> bytes | None:
    client = aioredis.Redis.from_url(location.url)
    try:
        value = await client.get(key)
    finally:
        await client.aclose()
    return value.encode() if isinstance(value, str) else value


def names_of(keys: Iterable[bytes | str]) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)


async def test_key_layout_index_and_marker(location: Location, raw: aioredis.Redis) -> None:
    stores = location.stores()
    try:
        await stores.store(DEFAULT_CONNECTION).save(sample_state(1))
        await stores.store("acme").save(sample_state(2))
        await stores.store("globex").save(sample_state(3))
        await stores.touch()
        async with stores.store("acme").lock(1.0):
            keys = names_of(await raw.keys("*"))
        async with stores.store("globex").lock(1.0):
            await stores.remove("globex")
        assert names_of(await raw.smembers(f"{PREFIX}connections")) == ["acme"]
        assert await raw.get(f"{PREFIX}changes") == b"2"  # one touch, one remove
        assert await stores.changed() == "2"
    finally:
        await stores.close()
    assert keys == [
        f"{PREFIX}c:acme:lock",
        f"{PREFIX}c:acme:state",
        f"{PREFIX}c:acme:version",
        f"{PREFIX}c:globex:state",
        f"{PREFIX}c:globex:version",
        f"{PREFIX}changes",
        f"{PREFIX}connections",
        f"{PREFIX}state",
        f"{PREFIX}version",
    ]
    # Every write bumped its entry's version; a removed entry's version stays behind.
    assert await raw_get(location, f"{PREFIX}c:globex:version") == b"2"


async def test_save_and_delete_touch_the_index_and_version_in_one_script(
    location: Location, raw: aioredis.Redis
) -> None:
    stores = location.stores()
    seen: list[str] = []
    try:
        async with raw.monitor() as monitor:
            await stores.store("acme").save(sample_state(1))
            await stores.store("acme").delete()
            while seen.count("INCR") < 2:
                command = await asyncio.wait_for(monitor.next_command(), 5.0)
                verb = command["command"].split()[0].upper()
                if verb not in {"HELLO", "CLIENT", "SCRIPT"}:  # set-up, loading the script
                    seen.append(verb if command["client_type"] == "lua" else "EVALSHA")
    finally:
        await stores.close()
    # A NOSCRIPT reply makes redis-py load the script and send it again.
    while seen[:2] == ["EVALSHA", "EVALSHA"]:
        seen.pop(0)
    # Outside a lock: no lock check, no version check, but the version is bumped.
    assert seen == [
        *("EVALSHA", "GET", "SET", "SADD", "INCR"),
        *("EVALSHA", "GET", "DEL", "SREM", "INCR"),
    ]


async def test_an_index_entry_without_its_value_is_not_listed(
    location: Location, raw: aioredis.Redis
) -> None:
    stores = location.stores()
    try:
        await stores.store("acme").save(sample_state(1))
        # What eviction or a DEL behind the store's back leaves: a name, no value.
        await raw.sadd(f"{PREFIX}connections", "ghost", "Not:A:Name")
        assert await stores.names() == ["acme"]
        assert not await stores.exists("ghost")
        await stores.verify()
    finally:
        await stores.close()


async def test_one_client_connection_for_fifty_connections(
    location: Location, raw: aioredis.Redis
) -> None:
    stores = location.stores()
    try:
        for n in range(50):
            store = stores.store(f"company-{n}")
            async with store.lock(1.0):
                await store.save(sample_state(n))
            assert await store.load() == sample_state(n)
            await store.close()  # a handle: the shared client stays open
        await stores.names()
        clients = await raw.client_list()
    finally:
        await stores.close()
    # Ours and the raw one: a client per connection would make fifty-one.
    assert len(clients) <= 2, clients


async def test_open_stores_default_is_what_open_store_reads(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = _config(redis_url, tmp_path, client_id="client-one")
    stores, legacy = open_stores(config), open_store(config)
    assert isinstance(stores, RedisStores)
    try:
        await stores.store(DEFAULT_CONNECTION).save(sample_state(6))
        assert await legacy.load() == sample_state(6)
        assert await stores.names() == [DEFAULT_CONNECTION]
    finally:
        await stores.close()
        await legacy.close()


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
    assert keys == [f"{prefix}lock", f"{prefix}state", f"{prefix}version"]
    assert state.tokens is not None
    assert state.tokens.refresh_token is not None
    secrets = (state.tokens.access_token.reveal(), state.tokens.refresh_token.reveal())
    for value in values:
        assert value is not None
        for text in (*secrets, "ACCESS-TOKEN", "REFRESH-TOKEN", "Example ApS", "atrest"):
            assert text.encode() not in value
    assert not (tmp_path / "tokens.enc").exists()  # Redis only: no token file


async def test_closed_store_refuses_use(location: Location) -> None:
    store = location.store()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.load()
    with pytest.raises(StoreError, match="closed"):
        store.lock(1.0)


async def test_verify_checks_default_and_leaves_other_connections_to_their_use(
    location: Location,
) -> None:
    sealer, configured = generate_key(), generate_key()
    writer = RedisStores(
        RedisBackend(location.url, key_file=location.key_file, key=sealer), prefix=PREFIX
    )
    reader = RedisStores(
        RedisBackend(location.url, key_file=location.key_file, key=configured), prefix=PREFIX
    )
    try:
        await writer.store("acme").save(sample_state(1))
        await reader.verify()  # one customer's entry never stops the start-up
        with pytest.raises(StoreError) as caught:
            await reader.store("acme").load()
        assert "token state in Redis for connection acme" in caught.value.detail
        assert key_id(sealer) in caught.value.detail
        await writer.store("default").save(sample_state(2))
        with pytest.raises(StoreError) as caught:
            await reader.verify()
    finally:
        await writer.close()
        await reader.close()
    assert key_id(sealer) in caught.value.detail
    assert key_id(configured) in caught.value.detail
