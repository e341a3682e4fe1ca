"""The one suite every `ConnectionStores` must pass (files, Redis), written against the protocol.

A backend's test module builds a `StoresHarness` for a fresh location and runs every
check in `STORES_CHECKS`, e.g. `@pytest.mark.parametrize("check", STORES_CHECKS, ids=check_id)`.
The checks know nothing of files or Redis: the legacy store, what is at rest and child
processes come from the harness.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import pytest

from proxy.errors import LockTimeout, StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store import ConnectionStores, TokenStore
from tests.store.contract import sample_state

CHILD_TIMEOUT = 30.0
MANY = 1_000

T = TypeVar("T")


@dataclass(frozen=True)
class StoresHarness:
    """How the suite reaches one backend's location."""

    make_stores: Callable[[], Awaitable[ConnectionStores]]  # a fresh instance, same location
    # The pre-connections store of the same location (FileStore(tokens.path) /
    # RedisStore.from_config): what `store("default")` must read and write.
    make_legacy: Callable[[], Awaitable[TokenStore]]
    raw_values: Callable[[], Awaitable[list[bytes]]]  # every byte string at rest there
    # Python source run at the top of a child process: it must define
    # `async def make_stores() -> ConnectionStores` bound to the same location.
    child_setup: str


StoresCheck = Callable[[StoresHarness], Awaitable[None]]


@asynccontextmanager
async def opened(harness: StoresHarness) -> AsyncIterator[ConnectionStores]:
    stores = await harness.make_stores()
    try:
        yield stores
    finally:
        await stores.close()


async def check_entries_are_independent(harness: StoresHarness) -> None:
    async with opened(harness) as stores:
        one, two = stores.store("acme"), stores.store("acme2")
        await one.save(sample_state(1, marker="one"))
        await two.save(sample_state(2, marker="two"))
        assert await one.load() == sample_state(1, marker="one")
        assert await two.load() == sample_state(2, marker="two")
        assert await stores.store(DEFAULT_CONNECTION).load() is None
        await one.save(sample_state(3, marker="one"))
        await one.delete()
        assert await one.load() is None
        assert await two.load() == sample_state(2, marker="two")
    async with opened(harness) as again:
        assert await again.store("acme2").load() == sample_state(2, marker="two")


async def check_default_is_the_legacy_entry(harness: StoresHarness) -> None:
    legacy = await harness.make_legacy()
    try:
        async with opened(harness) as stores:
            await stores.store(DEFAULT_CONNECTION).save(sample_state(4, marker="new"))
            assert await legacy.load() == sample_state(4, marker="new")
            await legacy.save(sample_state(5, marker="old"))
            assert await stores.store(DEFAULT_CONNECTION).load() == sample_state(5, marker="old")
            # An entry the pre-connections store wrote is listed too.
            assert await stores.names() == [DEFAULT_CONNECTION]
            assert await stores.exists(DEFAULT_CONNECTION)
            async with legacy.lock(1.0):
                with pytest.raises(LockTimeout):
                    async with stores.store(DEFAULT_CONNECTION).lock(0.2):
                        pytest.fail("default's lock is not the legacy store's lock")
            await legacy.delete()
            assert await stores.names() == []
    finally:
        await legacy.close()


async def check_names_lists_exactly_the_entries(harness: StoresHarness) -> None:
    async with opened(harness) as stores:
        assert await stores.names() == []
        for name in ("zeta", "acme.eu", DEFAULT_CONNECTION, "0-first", "b_2"):
            await stores.store(name).save(sample_state(1, marker=name))
        expected = ["0-first", "acme.eu", "b_2", DEFAULT_CONNECTION, "zeta"]
        assert await stores.names() == expected
        async with stores.store("zeta").lock(1.0):
            await stores.store("zeta").delete()
        async with stores.store("b_2").lock(1.0):
            await stores.remove("b_2")
        await stores.remove("never-saved")
        assert await stores.names() == ["0-first", "acme.eu", DEFAULT_CONNECTION]
        await stores.remove(DEFAULT_CONNECTION)
        assert await stores.names() == ["0-first", "acme.eu"]
    async with opened(harness) as again:
        assert await again.names() == ["0-first", "acme.eu"]


async def check_exists(harness: StoresHarness) -> None:
    async with opened(harness) as stores:
        for name in ("acme", "acme2", DEFAULT_CONNECTION):
            assert not await stores.exists(name)
        await stores.store("acme2").save(sample_state(1))
        assert await stores.exists("acme2")
        assert not await stores.exists("acme")  # a prefix of another name is not it
        await stores.store(DEFAULT_CONNECTION).save(sample_state(2))
        assert await stores.exists(DEFAULT_CONNECTION)
        await stores.store("acme2").delete()
        assert not await stores.exists("acme2")
        await stores.remove(DEFAULT_CONNECTION)
        assert not await stores.exists(DEFAULT_CONNECTION)


async def check_changed_after_touch_and_remove(harness: StoresHarness) -> None:
    async with opened(harness) as stores, opened(harness) as other:
        seen = [await stores.changed()]
        assert await stores.changed() == seen[-1]  # reading does not change it
        await stores.touch()
        seen.append(await stores.changed())
        await stores.touch()
        seen.append(await stores.changed())
        await stores.store("acme").save(sample_state(1))
        await stores.remove("acme")
        seen.append(await stores.changed())
        await stores.remove("acme")  # absent: no error, still a change
        seen.append(await stores.changed())
        assert len(set(seen)) == len(seen)
        assert await other.changed() == seen[-1]  # another instance sees the same marker


async def check_store_handles_share_the_backend(harness: StoresHarness) -> None:
    stores = await harness.make_stores()
    first = stores.store("acme")
    await first.save(sample_state(1))
    await first.close()  # ends this handle only
    await first.close()
    with pytest.raises(StoreError, match="closed"):
        await first.load()
    kept = stores.store("other")
    assert await stores.store("acme").load() == sample_state(1)
    await stores.close()
    await stores.close()
    for action in (kept.load, stores.names, stores.touch, stores.verify):
        with pytest.raises(StoreError, match="closed"):
            await action()
    with pytest.raises(StoreError, match="closed"):
        stores.store("acme")


async def check_invalid_name_is_refused(harness: StoresHarness) -> None:
    async with opened(harness) as stores:
        for bad in ("../escape", "a/b", "", "UPPER", "a:b"):
            with pytest.raises(ValueError, match="invalid connection name"):
                stores.store(bad)
        assert await stores.names() == []


async def check_verify(harness: StoresHarness) -> None:
    async with opened(harness) as stores:
        await stores.verify()
        await stores.store("acme").save(sample_state(1))
        await stores.verify()
        await stores.store(DEFAULT_CONNECTION).save(sample_state(2))
        await stores.verify()


async def check_locks_of_two_connections_are_independent(harness: StoresHarness) -> None:
    async with opened(harness) as stores, opened(harness) as other:
        async with stores.store("acme").lock(1.0):
            async with other.store("globex").lock(0.5), other.store(DEFAULT_CONNECTION).lock(0.5):
                pass
            with pytest.raises(LockTimeout):
                async with other.store("acme").lock(0.2):
                    pytest.fail("took a connection's lock another instance holds")
        async with other.store("acme").lock(0.5):
            pass


HOLDER_SCRIPT = """
import asyncio, sys

async def _hold():
    stores = await make_stores()
    try:
        async with stores.store(NAME).lock(10.0):
            print("locked", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        await stores.close()

asyncio.run(_hold())
"""


async def check_lock_excludes_other_process(harness: StoresHarness) -> None:
    script = harness.child_setup + "NAME = 'acme'\n" + HOLDER_SCRIPT
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        line = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
        assert line == b"locked\n"
        async with opened(harness) as stores:
            with pytest.raises(LockTimeout):
                async with stores.store("acme").lock(0.3):
                    pytest.fail("took a lock another process holds")
            async with stores.store("globex").lock(0.5), stores.store("default").lock(0.5):
                pass  # other connections' locks are free meanwhile
            child.stdin.write(b"release\n")
            await child.stdin.drain()
            assert await asyncio.wait_for(child.wait(), CHILD_TIMEOUT) == 0
            async with stores.store("acme").lock(1.0):
                pass
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def check_no_plaintext_at_rest(harness: StoresHarness) -> None:
    names = ("acme", "globex", DEFAULT_CONNECTION)
    states = [sample_state(n, marker=f"plain-{name}") for n, name in enumerate(names)]
    async with opened(harness) as stores:
        for name, state in zip(names, states, strict=True):
            await stores.store(name).save(state)
        await stores.touch()
        values = await harness.raw_values()
    assert values
    texts = ["ACCESS-TOKEN", "REFRESH-TOKEN", "Example ApS", "plain-"]
    for state in states:
        assert state.tokens is not None
        assert state.tokens.refresh_token is not None
        texts += [state.tokens.access_token.reveal(), state.tokens.refresh_token.reveal()]
    for value in values:
        for text in texts:
            assert text.encode() not in value


async def check_a_thousand_connections(harness: StoresHarness) -> None:
    names = [f"company-{n:04d}" for n in range(MANY)]
    async with opened(harness) as stores:
        await _gather_bounded(
            stores.store(name).save(sample_state(n, marker=name)) for n, name in enumerate(names)
        )
        assert await stores.names() == names
    async with opened(harness) as reader:
        loaded = await _gather_bounded(reader.store(name).load() for name in names)
        assert loaded == [sample_state(n, marker=name) for n, name in enumerate(names)]
        assert await reader.exists(names[-1])


async def _gather_bounded(awaitables: Iterable[Awaitable[T]], limit: int = 50) -> list[T]:
    """`asyncio.gather` with at most `limit` in flight, as a proxy's many tasks would be."""
    gate = asyncio.Semaphore(limit)

    async def one(awaitable: Awaitable[T]) -> T:
        async with gate:
            return await awaitable

    return await asyncio.gather(*(one(a) for a in awaitables))


STORES_CHECKS: tuple[StoresCheck, ...] = (
    check_entries_are_independent,
    check_default_is_the_legacy_entry,
    check_names_lists_exactly_the_entries,
    check_exists,
    check_changed_after_touch_and_remove,
    check_store_handles_share_the_backend,
    check_invalid_name_is_refused,
    check_verify,
    check_locks_of_two_connections_are_independent,
    check_lock_excludes_other_process,
    check_no_plaintext_at_rest,
    check_a_thousand_connections,
)
