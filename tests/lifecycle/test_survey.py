"""The survey of entries not in memory, on a real file store: skips, unreadable entries."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from proxy.config import Refresh
from proxy.lifecycle.survey import SURVEY_BATCH, read_entries, unused_due
from proxy.secret import Secret
from proxy.store import open_stores
from proxy.tokenset import StoredState, TokenSet
from tests.flows import sandbox_config


def granted(now: float) -> StoredState:
    tokens = TokenSet(Secret("at"), Secret("rt"), expires_at=now + 3600, lifetime=3600)
    return StoredState(tokens=tokens, obtained_at=now)


async def test_entries_are_read_except_skipped_and_unreadable_ones(tmp_path: Path) -> None:
    stores = open_stores(sandbox_config("http://127.0.0.1:9", tmp_path))
    try:
        names = [f"c{index:03d}" for index in range(SURVEY_BATCH + 5)]
        for name in names:
            await stores.store(name).save(granted(time.time()))
        (tmp_path / "connections" / "c001.enc").write_bytes(b"\x00garbage")
        entries = read_entries(stores, names, skip=lambda name: name == "c002")
        async with contextlib.aclosing(entries):
            read = {name: stored async for name, stored in entries}
    finally:
        await stores.close()
    assert sorted(read) == [n for n in names if n not in ("c001", "c002")]
    assert all(stored is not None and stored.tokens is not None for stored in read.values())


def test_a_connection_not_in_memory_is_due_for_its_keepalive_only() -> None:
    now = time.time()
    refresh = Refresh(keepalive=86400.0)
    due = unused_due(granted(now), refresh, now=now)
    assert due is not None
    assert due.keepalive
    assert now + 0.9 * 86400 <= due.at <= now + 86400
    assert unused_due(StoredState(), refresh, now=now) is None
