"""Writes of one connection's entry outside a refresh: a new grant, a connect link, an
empty or deleted entry. Each runs under the connection's store lock, so it never
interleaves with a refresh of another process, and returns what the store now holds.
Must not decide anything about refreshing or hold state of its own.
"""

from __future__ import annotations

from typing import Any

from proxy.store import TokenStore
from proxy.tokenset import Link, StoredState, TokenSet


def _next_generation(previous: StoredState | None) -> int:
    return previous.generation + 1 if previous else 1


async def write_grant(
    store: TokenStore,
    tokens: TokenSet,
    *,
    lock_timeout: float,
    now: float,
    subject: str | None = None,
    company_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> StoredState:
    """A freshly granted token set replaces whatever the entry held (its link included)."""
    async with store.lock(lock_timeout):
        state = StoredState(
            tokens=tokens,
            subject=subject,
            company_name=company_name,
            obtained_at=now,
            generation=_next_generation(await store.load()),
            extra=dict(extra or {}),
        )
        await store.save(state)
    return state


async def write_link(store: TokenStore, link: Link, *, lock_timeout: float) -> StoredState:
    """A new connect link (replacing any earlier one); the tokens stay as they are."""
    async with store.lock(lock_timeout):
        state = (await store.load() or StoredState()).evolve(link=link)
        await store.save(state)
    return state


async def write_empty(store: TokenStore, *, lock_timeout: float) -> StoredState:
    """An entry without tokens: the connection is still known, and unauthorised."""
    async with store.lock(lock_timeout):
        state = StoredState(generation=_next_generation(await store.load()))
        await store.save(state)
    return state


async def delete_entry(store: TokenStore, *, lock_timeout: float) -> None:
    """No entry at all (under the lock: no refresh is half done then)."""
    async with store.lock(lock_timeout):
        await store.delete()
