"""Entries bound to their connection's name, and the upgrade from the old format: the checks
every `ConnectionStores` must pass (files, Redis), written against the protocol.

A backend's test module builds an `EntriesHarness` (raw bytes per entry, the record of
old-format entries, the key file) and runs every check in `NAMES_CHECKS`. The attacker
these checks stand for can write the store but not read the key: they copy bytes.
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
    drop_record: Callable[[], Awaitable[None]]  # remove the record of old-format entries
    key_file: Path


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
        await stores.verify()  # the first start of this version: records them
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


async def check_an_old_format_entry_copied_over_another_is_refused(
    harness: EntriesHarness,
) -> None:
    await old_store(harness)
    async with opened(harness) as stores:
        await stores.verify()
        await copy_entry(harness, "acme", "globex")
        detail = await refused(
            stores.store("globex"), naming="globex", hiding=secrets_of(sample_state(1, "acme"))
        )
        assert "old format" in detail
        assert await stores.store("acme").load() == sample_state(1, "acme")
        # Also once the copied one was rewritten in the new format: the old bytes stay bound.
        await stores.store("acme").save(sample_state(7, "acme"))
        await refused(stores.store("globex"), naming="globex", hiding=[])


async def check_old_format_entries_without_a_record_are_refused(harness: EntriesHarness) -> None:
    # Every start records them first; an old-format entry read before that is not trusted.
    await old_store(harness)
    async with opened(harness) as stores:
        detail = await refused(stores.store("acme"), naming="acme", hiding=[])
        assert "no record" in detail
        await stores.verify()
        assert await stores.store("acme").load() == sample_state(1, "acme")


async def check_a_new_location_trusts_no_old_format_entry(harness: EntriesHarness) -> None:
    async with opened(harness) as stores:
        await stores.verify()  # nothing here: the record made allows nothing
        await stores.store("acme").save(sample_state(1, "acme"))
    # Sealed under the store's own key: only the record can refuse it.
    blob = seal_v1(state_to_json(sample_state(2, "globex")), read_key_file(harness.key_file))
    await harness.write_entry("globex", blob)
    async with opened(harness) as stores:
        await stores.verify()
        await refused(stores.store("globex"), naming="globex", hiding=[])


async def check_a_removed_record_is_not_made_again_from_what_is_there(
    harness: EntriesHarness,
) -> None:
    # Removing the record must not let the next start trust an old-format copy: once an
    # entry is in the new format, a new record allows nothing (and the entries left in the
    # old format are refused with it: fail closed, they can be imported again).
    await old_store(harness)
    async with opened(harness) as stores:
        await stores.verify()
        await stores.store(DEFAULT_CONNECTION).save(sample_state(3, DEFAULT_CONNECTION))
        await copy_entry(harness, "acme", "globex")
    await harness.drop_record()
    async with opened(harness) as stores:
        await stores.verify()
        await refused(stores.store("globex"), naming="globex", hiding=[])
        await refused(stores.store("acme"), naming="acme", hiding=[])
        assert await stores.store(DEFAULT_CONNECTION).load() == sample_state(3, DEFAULT_CONNECTION)


NAMES_CHECKS: tuple[Check, ...] = (
    check_an_entry_copied_over_another_is_refused,
    check_old_format_entries_open_and_are_rewritten_at_their_next_write,
    check_an_old_format_entry_copied_over_another_is_refused,
    check_old_format_entries_without_a_record_are_refused,
    check_a_new_location_trusts_no_old_format_entry,
    check_a_removed_record_is_not_made_again_from_what_is_there,
)
