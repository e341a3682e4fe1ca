"""The refresh sequence on a fenced store (Redis): another holder's mark is never presented,
a holder whose lease ended writes its result only over its own mark, and a refresh left
unfinished past the grace is reported interrupted. The real sandbox, a real redis-server;
what another instance would do is done through a second store on the same Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.config import Config
from proxy.errors import ReauthorizationRequired, TransientOAuthError
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.rules import INTERRUPTED_REASON, TokenEvents, TokenState, bearer
from proxy.secret import Secret
from proxy.store.redis import RedisStore
from proxy.tokenset import StoredState, TokenSet
from tests.flows import grant_tokens, sandbox_config
from tests.redis_server import redis_url  # noqa: F401
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]

PREFIX = "pleo-proxy:fenced:"
KEY = b"s" * 32
LOCK = f"{PREFIX}lock"


class Outcomes(TokenEvents):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def refreshed(self, outcome: str) -> None:
        self.seen.append(outcome)


def redis_store(url: str, tmp_path: Path, *, lock_ttl: float = 45.0) -> RedisStore:
    return RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", key=KEY, lock_ttl=lock_ttl)


@asynccontextmanager
async def manager_on(
    config: Config, store: RedisStore, events: TokenEvents | None = None
) -> AsyncIterator[TokenManager]:
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(config, store, session, events=events)
        await manager.start(background=False)
        try:
            yield manager
        finally:
            await manager.close()
            await store.close()


async def authorised(sandbox: RunningSandbox, tmp_path: Path, url: str) -> tuple[Config, TokenSet]:
    """A config for the sandbox and the tokens of a fresh grant, stored in Redis."""
    await set_knobs(sandbox.url, access_ttl=300)
    config = sandbox_config(sandbox.url, tmp_path)
    tokens = await grant_tokens(config, now=time.time())
    store = redis_store(url, tmp_path)
    try:
        await store.save(StoredState(tokens=tokens, subject="urn:pleo:company:x", generation=1))
    finally:
        await store.close()
    return config, tokens


async def stored(url: str, tmp_path: Path) -> StoredState | None:
    store = redis_store(url, tmp_path)
    try:
        return await store.load()
    finally:
        await store.close()


async def wait_for_mark(url: str, tmp_path: Path) -> StoredState:
    deadline = time.monotonic() + 10
    while (state := await stored(url, tmp_path)) is None or state.refresh_started_at is None:
        assert time.monotonic() < deadline, "no refresh was marked"
        await asyncio.sleep(0.02)
    return state


async def test_another_holders_fresh_mark_is_left_to_it(
    sandbox: RunningSandbox,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    config, tokens = await authorised(sandbox, tmp_path, redis_url)
    other = redis_store(redis_url, tmp_path)
    before = await get_stats(sandbox.url)
    try:
        # What an instance whose final write failed leaves: its mark, the spent token.
        async with other.lock(1.0):
            marked = await other.load()
            assert marked is not None
            await other.save(marked.evolve(refresh_started_at=time.time()))
        async with manager_on(config, redis_store(redis_url, tmp_path)) as manager:
            with pytest.raises(TransientOAuthError, match="has not finished"):
                await manager.on_rejected(bearer(tokens))
            assert (await get_stats(sandbox.url))["token_requests"] == before["token_requests"]
            # The holder comes back and writes its tokens: they are taken, not refreshed.
            newer = replace(tokens, access_token=Secret("at-from-holder"))
            async with other.lock(1.0):
                current = await other.load()
                assert current is not None
                await other.save(current.evolve(tokens=newer, refresh_started_at=None))
            assert await manager.on_rejected(bearer(tokens)) == bearer(newer)
            assert manager.state is TokenState.AUTHORISED
    finally:
        await other.close()
    after = await get_stats(sandbox.url)
    assert after["token_requests"] == before["token_requests"]
    assert after["reuse_detected"] == 0


async def test_a_mark_older_than_the_grace_is_reported_interrupted(
    sandbox: RunningSandbox,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    config, tokens = await authorised(sandbox, tmp_path, redis_url)
    store = redis_store(redis_url, tmp_path, lock_ttl=1.0)
    assert store.mark_grace == 2.0
    started = time.time() - 5.0
    async with store.lock(1.0):
        marked = await store.load()
        assert marked is not None
        await store.save(marked.evolve(refresh_started_at=started))
    events = Outcomes()
    before = await get_stats(sandbox.url)
    async with manager_on(config, store, events) as manager:
        with pytest.raises(ReauthorizationRequired) as caught:
            await manager.on_rejected(bearer(tokens))
        assert manager.state is TokenState.REAUTHORIZATION_REQUIRED
        assert manager.status()["reason"] == INTERRUPTED_REASON
    assert INTERRUPTED_REASON in caught.value.detail
    assert events.seen == ["interrupted"]
    ended = await stored(redis_url, tmp_path)
    assert ended is not None
    assert (ended.tokens, ended.reauth_reason) == (None, INTERRUPTED_REASON)
    assert ended.refresh_started_at == started  # its holder may still recognise it
    after = await get_stats(sandbox.url)
    assert after["token_requests"] == before["token_requests"]  # the token was not presented


@pytest.mark.parametrize("meanwhile", ["nothing", "import", "interrupted"])
async def test_a_holder_whose_lease_ended_writes_only_over_its_own_mark(
    sandbox: RunningSandbox,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    meanwhile: str,
) -> None:
    config, tokens = await authorised(sandbox, tmp_path, redis_url)
    raw = aioredis.Redis.from_url(redis_url)
    other = redis_store(redis_url, tmp_path)
    imported = await grant_tokens(config, now=time.time())
    events = Outcomes()
    try:
        async with manager_on(config, redis_store(redis_url, tmp_path), events) as manager:
            await set_knobs(sandbox.url, token_latency=1.0)
            refresh = asyncio.create_task(manager.on_rejected(bearer(tokens)))
            mark = await wait_for_mark(redis_url, tmp_path)
            # The lease ends while Pleo answers (what its expiry does to a frozen holder),
            # and another instance takes the lock.
            await raw.delete(LOCK)
            async with other.lock(1.0):
                current = await other.load()
                assert current == mark
                if meanwhile == "import":  # a new consent, written meanwhile
                    await other.save(StoredState(tokens=imported, generation=mark.generation + 1))
                elif meanwhile == "interrupted":  # as an instance past the grace reports it
                    await other.save(
                        StoredState(
                            refresh_started_at=mark.refresh_started_at,
                            reauth_reason=INTERRUPTED_REASON,
                            generation=mark.generation + 1,
                        )
                    )
                await asyncio.sleep(1.5)  # Pleo answers the holder while we hold the lock
            new = await asyncio.wait_for(refresh, 30)
            final = await stored(redis_url, tmp_path)
            assert final is not None
            assert final.refresh_started_at is None
            assert final.tokens is not None
            assert new == bearer(final.tokens)  # what it hands out is what is stored
            assert manager.state is TokenState.AUTHORISED
            if meanwhile == "import":
                assert final.tokens.access_token == imported.access_token  # not overwritten
            else:
                assert final.tokens.access_token != tokens.access_token
                assert final.refresh_count == 1
    finally:
        await other.close()
        await raw.aclose()
    assert "lock_lost" in events.seen
    stats = await get_stats(sandbox.url)
    assert stats["refresh_grants"] == 1
    assert stats["reuse_detected"] == 0
