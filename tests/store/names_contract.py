"""Entries bound to their connection's name, and the upgrade from the old format: the checks
every `ConnectionStores` must pass (files, Redis), written against the protocol.

A backend's test module builds an `EntriesHarness` (raw bytes per entry, the key file, the
key rotation if it has one) and runs every check in `NAMES_CHECKS`. The attacker these
checks stand for can write the store but not read the key: they copy bytes.

The policy (SECURITY.md, threat 5): every write is PLEOPX2, bound to its name; a PLEOPX1
entry opens under whatever name it is found, whenever it was written (an older instance
in a rolling upgrade still writes them), until its next write here; `rotate-key` rewrites
every entry, and then no PLEOPX1 blob (sealed under the retired key) opens at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.errors import StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store import ConnectionStores, TokenStore
from proxy.store.crypto import (
    MAGIC,
    format_key,
    generate_key,
    is_legacy,
    key_id,
    read_key_file,
    write_private,
)
from proxy.tokenset import StoredState, state_to_json
from tests.store.contract import sample_state
from tests.store.old_format import seal_v1

OLD_NAMES = (DEFAULT_CONNECTION, "acme", "globex")


@dataclass(frozen=True)
class EntriesHarness:
    """How the suite reaches one backend's location, entry by entry."""

    make_stores: Callable[[], Awaitable[ConnectionStores]]  # a fresh instance, same location
    make_legacy: Callable[[], Awaitable[TokenStore]]  # the pre-connections `default` store
    read_entry: Callable[[str], Awaitable[bytes | None]]  # connection NAME's bytes at rest
    # Put bytes at rest as connection NAME's entry, as an older pleo-proxy or a copy would
    # (listed like any entry: in Redis its name joins the index).
    write_entry: Callable[[str, bytes], Awaitable[None]]
    key_file: Path
    # `pleo-proxy rotate-key` on this location; None where there is none (Redis).
    rotate: Callable[[], Awaitable[None]] | None = None


Check = Callable[[EntriesHarness], Awaitable[None]]


@asynccontextmanager
async def opened(harness: EntriesHarness) -> AsyncIterator[ConnectionStores]:
    stores = await harness.make_stores()
    try:
        yield stores
    finally:
        await stores.close()


async def copy_entry(harness: EntriesHarness, source: str, target: str) -> bytes:
    blob = await harness.read_entry(source)
    assert blob is not None
    await harness.write_entry(target, blob)
    return blob


def secrets_of(*states: StoredState) -> list[str]:
    found = []
    for state in states:
        assert state.tokens is not None
        assert state.tokens.refresh_token is not None
        found += [state.tokens.access_token.reveal(), state.tokens.refresh_token.reveal()]
    return found


async def refused(store: TokenStore, *, naming: str, hiding: list[str]) -> str:
    """The StoreError `store.load()` raises: it names `naming`, and none of `hiding`."""
    with pytest.raises(StoreError) as caught:
        await store.load()
    detail = caught.value.detail
    assert naming in detail
    for secret in hiding:
        assert secret not in detail
        assert secret not in str(caught.value)
    return detail


async def old_store(harness: EntriesHarness, names: tuple[str, ...] = OLD_NAMES) -> bytes:
    """A location as an older pleo-proxy left it: a key file and PLEOPX1 entries only."""
    key = generate_key()
    harness.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(harness.key_file, format_key(key))
    for n, name in enumerate(names):
        await harness.write_entry(name, seal_v1(state_to_json(sample_state(n, name)), key))
    return key


async def check_an_entry_copied_over_another_is_refused(harness: EntriesHarness) -> None:
    acme, globex = sample_state(1, marker="acme"), sample_state(2, marker="globex")
    async with opened(harness) as stores:
        await stores.verify()
        await stores.store("acme").save(acme)
        await stores.store("globex").save(globex)
        await copy_entry(harness, "acme", "globex")
        detail = await refused(stores.store("globex"), naming="globex", hiding=secrets_of(acme))
        assert "another connection's entry" in detail
        assert await stores.store("acme").load() == acme
        await stores.verify()  # only `default` stops a start
        await copy_entry(harness, "acme", DEFAULT_CONNECTION)
        await refused(stores.store(DEFAULT_CONNECTION), naming="default", hiding=secrets_of(acme))
        with pytest.raises(StoreError):
            await stores.verify()
    legacy = await harness.make_legacy()
    try:
        await refused(legacy, naming="default", hiding=secrets_of(acme))
    finally:
        await legacy.close()


async def check_old_format_entries_open_and_are_rewritten_at_their_next_write(
    harness: EntriesHarness,
) -> None:
    await old_store(harness)
    async with opened(harness) as stores:
        # Before any start-up check too: nothing is recorded or needed first.
        assert await stores.store("acme").load() == sample_state(1, "acme")
        await stores.verify()
        for n, name in enumerate(OLD_NAMES):
            assert await stores.store(name).load() == sample_state(n, name)
            assert is_legacy(await harness.read_entry(name) or b"")  # read, not rewritten
        await stores.store("acme").save(sample_state(5, "acme"))
        rewritten = await harness.read_entry("acme")
        assert rewritten is not None
        assert rewritten.startswith(MAGIC)
    legacy = await harness.make_legacy()
    try:
        assert await legacy.load() == sample_state(0, DEFAULT_CONNECTION)
        await legacy.save(sample_state(6, DEFAULT_CONNECTION))
        assert (await harness.read_entry(DEFAULT_CONNECTION) or b"").startswith(MAGIC)
    finally:
        await legacy.close()
    async with opened(harness) as again:
        await again.verify()
        assert await again.store("acme").load() == sample_state(5, "acme")
        assert await again.store("globex").load() == sample_state(2, "globex")
        assert await again.store(DEFAULT_CONNECTION).load() == sample_state(6, DEFAULT_CONNECTION)


async def check_an_old_format_entry_copied_over_another_still_opens(
    harness: EntriesHarness,
) -> None:
    # The documented residual risk: PLEOPX1 binds no name, so a copy of one under another
    # name opens there, until that entry is written here or rotate-key retires the key.
    await old_store(harness)
    acme_v1 = await copy_entry(harness, "acme", "globex")
    async with opened(harness) as stores:
        await stores.verify()
        assert await stores.store("globex").load() == sample_state(1, "acme")
        # Written again here, the copy is globex's own entry in the new format.
        await stores.store("globex").save(sample_state(8, "globex"))
        assert (await harness.read_entry("globex") or b"").startswith(MAGIC)
        assert await stores.store("globex").load() == sample_state(8, "globex")
        # acme rewritten as PLEOPX2 does not end it: the old bytes, put back, still open.
        await stores.store("acme").save(sample_state(7, "acme"))
        await harness.write_entry("globex", acme_v1)
        assert await stores.store("globex").load() == sample_state(1, "acme")


async def check_an_old_format_entry_written_after_the_upgrade_opens(
    harness: EntriesHarness,
) -> None:
    # A rolling upgrade: instances of this version and older ones share the store, and an
    # older one goes on refreshing (writing PLEOPX1) after this version's first start. No
    # grant is lost: whatever it writes is read, and this version's next write binds it.
    async with opened(harness) as stores:
        await stores.verify()  # a new location: the key is made here
        await stores.store("acme").save(sample_state(1, "acme"))
        key = read_key_file(harness.key_file)
        older = {
            "acme": sample_state(2, "acme"),  # an older instance refreshed acme
            "globex": sample_state(3, "globex"),  # and authorised a new connection
            DEFAULT_CONNECTION: sample_state(4, DEFAULT_CONNECTION),
        }
        for name, state in older.items():
            await harness.write_entry(name, seal_v1(state_to_json(state), key))
        await stores.verify()
        for name, state in older.items():
            assert await stores.store(name).load() == state
        await stores.store("globex").save(sample_state(5, "globex"))
        assert (await harness.read_entry("globex") or b"").startswith(MAGIC)
        # And again after that: the older instance refreshed globex once more.
        await harness.write_entry("globex", seal_v1(state_to_json(sample_state(6, "globex")), key))
    async with opened(harness) as again:
        await again.verify()
        assert await again.store("globex").load() == sample_state(6, "globex")
        assert await again.store("acme").load() == sample_state(2, "acme")


async def check_after_rotate_key_no_old_format_blob_opens(harness: EntriesHarness) -> None:
    # How an operator closes the legacy window once every instance runs this version.
    # Not in NAMES_CHECKS: only stores with a rotate-key run it (Redis has none yet).
    assert harness.rotate is not None
    old_key = await old_store(harness)
    old_blobs = {name: await harness.read_entry(name) for name in OLD_NAMES}
    await harness.rotate()
    new_key = read_key_file(harness.key_file)
    assert key_id(new_key) != key_id(old_key)
    async with opened(harness) as stores:
        for n, name in enumerate(OLD_NAMES):
            blob = await harness.read_entry(name)
            assert blob is not None
            assert blob.startswith(MAGIC)  # every entry rewritten as PLEOPX2
            assert await stores.store(name).load() == sample_state(n, name)
        # Put back from a backup, under its own name or another's: sealed under the
        # retired key, it opens nowhere.
        for name, blob in old_blobs.items():
            assert blob is not None
            for target in (name, "globex"):
                await harness.write_entry(target, blob)
                detail = await refused(
                    stores.store(target), naming=key_id(old_key), hiding=secrets_of()
                )
                assert "not the configured key" in detail
                assert key_id(new_key) in detail
        # A PLEOPX2 entry copied over another is refused under the new key too.
        await stores.store("acme").save(sample_state(9, "acme"))
        await copy_entry(harness, "acme", "globex")
        await refused(stores.store("globex"), naming="globex", hiding=[])


NAMES_CHECKS: tuple[Check, ...] = (
    check_an_entry_copied_over_another_is_refused,
    check_old_format_entries_open_and_are_rewritten_at_their_next_write,
    check_an_old_format_entry_copied_over_another_still_opens,
    check_an_old_format_entry_written_after_the_upgrade_opens,
)
