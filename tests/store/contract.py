"""The one suite every `TokenStore` must pass (file, Redis, ...), written against the protocol.

A store's test module builds a `Harness` for a fresh backing location and runs every
check in `CHECKS`, e.g. `@pytest.mark.parametrize("check", CHECKS, ids=check_id)`.
The checks know nothing of files or Redis: raw bytes and child processes come from
the harness.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from proxy.errors import LockTimeout, StoreError
from proxy.secret import Secret
from proxy.store import TokenStore
from proxy.tokenset import StoredState, TokenSet

MakeStore = Callable[[], Awaitable[TokenStore]]
RawBytes = Callable[[], Awaitable[bytes | None]]
WriteRaw = Callable[[bytes], Awaitable[None]]

CHILD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Harness:
    """How the suite reaches one store's backing location."""

    make_store: MakeStore  # a fresh store instance bound to the same location
    raw_bytes: RawBytes  # what is at rest there (None when nothing is stored)
    write_raw: WriteRaw  # put bytes at rest there, bypassing the store
    # Python source run at the top of a child process: it must define
    # `async def make_store() -> TokenStore` bound to the same location.
    child_setup: str


Check = Callable[[Harness], Awaitable[None]]


def sample_state(generation: int, marker: str = "") -> StoredState:
    """A state whose token strings are unique to (generation, marker)."""
    tag = f"{marker}{generation}"
    tokens = TokenSet(
        access_token=Secret(f"ACCESS-TOKEN-{tag}-a1b2c3"),
        refresh_token=Secret(f"REFRESH-TOKEN-{tag}-d4e5f6"),
        expires_at=1_900_000_000.0 + generation,
        lifetime=3600.0,
        scopes=("expenses:read", "users:read"),
    )
    return StoredState(
        tokens=tokens,
        subject="urn:pleo:company:11111111-2222-3333-4444-555555555555",
        company_name="Example ApS",
        refresh_count=generation,
        generation=generation,
        extra={"marker": tag},
    )


@asynccontextmanager
async def opened(harness: Harness) -> AsyncIterator[TokenStore]:
    store = await harness.make_store()
    try:
        yield store
    finally:
        await store.close()


async def check_missing_is_none(harness: Harness) -> None:
    async with opened(harness) as store:
        assert await store.load() is None
        assert await harness.raw_bytes() is None


async def check_round_trip(harness: Harness) -> None:
    state = sample_state(7)
    async with opened(harness) as writer:
        await writer.save(state)
    async with opened(harness) as reader:
        assert await reader.load() == state


async def check_save_overwrites(harness: Harness) -> None:
    async with opened(harness) as store:
        await store.save(sample_state(1))
        await store.save(sample_state(2))
    async with opened(harness) as reader:
        assert await reader.load() == sample_state(2)


async def check_delete(harness: Harness) -> None:
    async with opened(harness) as store:
        await store.delete()  # absent: no error
        await store.save(sample_state(3))
        await store.delete()
        assert await store.load() is None
        assert await harness.raw_bytes() is None
        await store.delete()


async def check_no_plaintext_at_rest(harness: Harness) -> None:
    state = sample_state(5, marker="plain")
    async with opened(harness) as store:
        await store.save(state)
    raw = await harness.raw_bytes()
    assert raw is not None
    assert state.tokens is not None
    assert state.tokens.refresh_token is not None
    for text in (
        state.tokens.access_token.reveal(),
        state.tokens.refresh_token.reveal(),
        "ACCESS-TOKEN",
        "REFRESH-TOKEN",
        "Example ApS",
    ):
        assert text.encode() not in raw


async def check_tampered_is_error(harness: Harness) -> None:
    async with opened(harness) as store:
        await store.save(sample_state(4))
        raw = await harness.raw_bytes()
        assert raw is not None
        tampered = raw[:-1] + bytes([raw[-1] ^ 0x01])
        await harness.write_raw(tampered)
        with pytest.raises(StoreError):
            await store.load()
        # Never silently replaced or removed.
        assert await harness.raw_bytes() == tampered


async def check_foreign_is_error(harness: Harness) -> None:
    await harness.write_raw(b'{"access_token": "not ours"}')
    async with opened(harness) as store:
        with pytest.raises(StoreError) as caught:
            await store.load()
        assert "not ours" not in caught.value.detail
    assert await harness.raw_bytes() == b'{"access_token": "not ours"}'


async def check_verify(harness: Harness) -> None:
    async with opened(harness) as store:
        await store.verify()
        await store.save(sample_state(1))
        await store.verify()


async def check_lock_excludes_other_instance(harness: Harness) -> None:
    async with opened(harness) as first, opened(harness) as second:
        async with first.lock(5.0):
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                async with second.lock(0.3):
                    pytest.fail("second store took a lock the first one holds")
            assert time.monotonic() - started >= 0.25  # it did wait, bounded
        async with second.lock(1.0):
            pass


async def check_lock_excludes_other_task(harness: Harness) -> None:
    async with opened(harness) as store:
        held = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with store.lock(5.0):
                held.set()
                await release.wait()

        task = asyncio.create_task(holder())
        try:
            await asyncio.wait_for(held.wait(), 5.0)
            with pytest.raises(LockTimeout):
                async with store.lock(0.0):
                    pytest.fail("a second task took a lock the first one holds")
        finally:
            release.set()
            await asyncio.wait_for(task, 5.0)
        async with store.lock(1.0):
            pass


async def check_lock_waits_for_release(harness: Harness) -> None:
    async with opened(harness) as first, opened(harness) as second:
        order: list[str] = []

        async def hold_briefly() -> None:
            async with first.lock(1.0):
                order.append("first")
                await asyncio.sleep(0.2)
                order.append("first released")

        task = asyncio.create_task(hold_briefly())
        await asyncio.sleep(0.05)
        async with second.lock(5.0):
            order.append("second")
        await task
        assert order == ["first", "first released", "second"]


async def check_lock_released_on_exception(harness: Harness) -> None:
    async with opened(harness) as store, opened(harness) as other:
        with pytest.raises(RuntimeError, match="boom"):
            async with store.lock(1.0):
                raise RuntimeError("boom")
        async with other.lock(0.5):
            pass


async def check_lock_released_on_cancellation(harness: Harness) -> None:
    async with opened(harness) as store, opened(harness) as other:
        held = asyncio.Event()

        async def holder() -> None:
            async with store.lock(1.0):
                held.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(holder())
        await asyncio.wait_for(held.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with other.lock(0.5):
            pass


async def check_concurrent_saves(harness: Harness) -> None:
    stores = [await harness.make_store() for _ in range(4)]
    try:
        await asyncio.gather(
            *(stores[n % len(stores)].save(sample_state(n, marker="c")) for n in range(60))
        )
        loaded = await stores[0].load()
    finally:
        for store in stores:
            await store.close()
    assert loaded is not None
    # Whole states only: whichever save came last, all of its fields belong together.
    assert loaded == sample_state(loaded.generation, marker="c")


HOLDER_SCRIPT = """
import asyncio, sys

async def _hold():
    store = await make_store()
    try:
        async with store.lock(10.0):
            print("locked", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        await store.close()

asyncio.run(_hold())
"""


async def check_lock_excludes_other_process(harness: Harness) -> None:
    child = await _spawn(harness.child_setup + HOLDER_SCRIPT)
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        line = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
        assert line == b"locked\n"
        async with opened(harness) as store:
            with pytest.raises(LockTimeout):
                async with store.lock(0.3):
                    pytest.fail("took a lock another process holds")
            child.stdin.write(b"release\n")
            await child.stdin.drain()
            assert await asyncio.wait_for(child.wait(), CHILD_TIMEOUT) == 0
            async with store.lock(1.0):
                pass
    finally:
        await _reap(child)


COUNTER_SCRIPT = """
import asyncio, dataclasses

async def _count():
    store = await make_store()
    try:
        for _ in range(ROUNDS):
            async with store.lock(20.0):
                state = await store.load()
                await store.save(dataclasses.replace(state, refresh_count=state.refresh_count + 1))
    finally:
        await store.close()

asyncio.run(_count())
"""


async def check_lock_serialises_processes(harness: Harness) -> None:
    """Read-modify-write under the lock from several processes loses no update."""
    processes, rounds = 3, 15
    async with opened(harness) as store:
        await store.save(sample_state(0, marker="counter"))
    script = harness.child_setup + f"ROUNDS = {rounds}\n" + COUNTER_SCRIPT
    children = [await _spawn(script) for _ in range(processes)]
    try:
        codes = await asyncio.wait_for(
            asyncio.gather(*(c.wait() for c in children)), CHILD_TIMEOUT * 2
        )
        assert codes == [0] * processes
    finally:
        for child in children:
            await _reap(child)
    async with opened(harness) as store:
        final = await store.load()
    assert final is not None
    assert final.refresh_count == processes * rounds


async def _spawn(script: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _reap(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.kill()
    await child.wait()


CHECKS: tuple[Check, ...] = (
    check_missing_is_none,
    check_round_trip,
    check_save_overwrites,
    check_delete,
    check_no_plaintext_at_rest,
    check_tampered_is_error,
    check_foreign_is_error,
    check_verify,
    check_lock_excludes_other_instance,
    check_lock_excludes_other_task,
    check_lock_waits_for_release,
    check_lock_released_on_exception,
    check_lock_released_on_cancellation,
    check_concurrent_saves,
    check_lock_excludes_other_process,
    check_lock_serialises_processes,
)


def check_id(check: object) -> str:
    """A readable pytest id for a check."""
    name = getattr(check, "__name__", str(check))
    return name.removeprefix("check_")
