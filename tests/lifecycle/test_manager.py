"""The token manager against the real sandbox and a real encrypted file store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Config, Refresh
from proxy.errors import ClientRejected, ReauthorizationRequired
from proxy.lifecycle.clocks import steady_clock
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.oauth import parse_token_response
from proxy.lifecycle.rules import (
    INTERRUPTED_REASON,
    TokenState,
    backoff_delay,
    bearer,
    refresh_margin,
)
from proxy.secret import Secret
from proxy.store import ConnectionStores, open_stores
from proxy.store.file import FileStore
from proxy.tokenset import TokenSet
from tests.clocks import Shifted
from tests.connections import wait_until
from tests.flows import grant_tokens, sandbox_config
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]


@asynccontextmanager
async def running_manager(
    config: Config,
    *,
    background: bool = False,
    clock: Callable[[], float] = time.time,
    steady: Callable[[], float] = steady_clock,
) -> AsyncIterator[TokenManager]:
    store = FileStore.from_config(config)
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(config, store, session, clock=clock, steady=steady)
        await manager.start(background=background)
        try:
            yield manager
        finally:
            await manager.close()
            await store.close()


async def authorised_manager_config(sandbox: RunningSandbox, tmp_path: Path, ttl: float) -> Config:
    await set_knobs(sandbox.url, access_ttl=ttl)
    return sandbox_config(sandbox.url, tmp_path)


async def install_fresh(manager: TokenManager, config: Config) -> TokenSet:
    tokens = await grant_tokens(config, now=time.time())
    await manager.install(tokens, subject="urn:pleo:company:x", company_name="Sandbox")
    return tokens


async def assert_one_refresh_no_reuse(sandbox: RunningSandbox) -> None:
    stats = await get_stats(sandbox.url)
    assert stats["refresh_grants"] == 1
    assert stats["reuse_detected"] == 0


def test_margin_is_half_the_lifetime_at_most() -> None:
    tokens = TokenSet(Secret("a"), Secret("r"), expires_at=100.0, lifetime=2.0)
    assert refresh_margin(tokens, 120) == 1.0
    assert refresh_margin(replace(tokens, lifetime=3600), 120) == 120


def test_backoff_is_bounded_and_honours_retry_after() -> None:
    for attempt in range(10):
        assert 0 <= backoff_delay(attempt) <= 8.0
    assert backoff_delay(0, retry_after=5) >= 5


def test_token_set_repr_shows_no_secret() -> None:
    tokens = TokenSet(Secret("at-value"), Secret("rt-value"), expires_at=1.0, lifetime=1.0)
    assert "at-value" not in repr(tokens)
    assert "rt-value" not in repr(tokens)


async def test_unauthorised_manager_answers_reauthorization_required(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = sandbox_config(sandbox.url, tmp_path)
    async with running_manager(config) as manager:
        assert manager.state is TokenState.UNAUTHORISED
        with pytest.raises(ReauthorizationRequired) as caught:
            await manager.authorization()
        assert caught.value.authorize_url == "http://localhost:8080/_proxy/authorize"


async def test_install_then_hand_out_and_status_has_no_secret(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=60)
    async with running_manager(config) as manager:
        tokens = await install_fresh(manager, config)
        assert manager.state is TokenState.AUTHORISED
        assert await manager.authorization() == bearer(tokens)
        status = str(manager.status())
        assert tokens.access_token.reveal() not in status
        assert tokens.refresh_token is not None
        assert tokens.refresh_token.reveal() not in status
        assert manager.status()["subject"] == "urn:pleo:company:x"


async def test_500_concurrent_requests_at_expiry_share_one_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=1)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
        await asyncio.sleep(max(0.0, old.expires_at - time.time()) + 0.05)
        headers = await asyncio.wait_for(
            asyncio.gather(*(manager.authorization() for _ in range(500))), 20
        )
    assert len(set(h.reveal() for h in headers)) == 1
    assert headers[0] != bearer(old)
    await assert_one_refresh_no_reuse(sandbox)


async def test_a_wall_clock_stepped_back_does_not_keep_an_expired_token_in_service(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=600)
    wall, steady = Shifted(time.time), Shifted(steady_clock)
    async with running_manager(config, clock=wall, steady=steady) as manager:
        old = await install_fresh(manager, config)
        assert await manager.authorization() == bearer(old)
        wall.offset = -3600.0  # NTP steps the wall clock back an hour...
        steady.offset = 601.0  # ...and the token's ten minutes pass
        assert old.is_valid(wall()), "by the stored expiry alone it lives an hour more"
        new = await manager.authorization()
        assert new != bearer(old), "refreshed, even though the store holds the same token"
        assert await manager.authorization() == new
    await assert_one_refresh_no_reuse(sandbox)


async def test_rejected_current_token_refreshes_once_and_old_token_does_not(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
        results = await asyncio.gather(*(manager.on_rejected(bearer(old)) for _ in range(50)))
        new = {r.reveal() for r in results if r is not None}
        assert len(new) == 1
        # A late 401 for the old token: the newer one is handed out, no new refresh.
        again = await manager.on_rejected(bearer(old))
        assert again is not None
        assert again.reveal() in new
    await assert_one_refresh_no_reuse(sandbox)


async def test_revoked_grant_ends_in_reauthorization_and_wipes_tokens(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
        await aiohttp_post(f"{sandbox.url}/_sandbox/revoke")
        with pytest.raises(ReauthorizationRequired):
            await manager.on_rejected(bearer(old))
        assert manager.state is TokenState.REAUTHORIZATION_REQUIRED
        with pytest.raises(ReauthorizationRequired):
            await manager.authorization()
    stored = await FileStore.from_config(config).load()
    assert stored is not None
    assert stored.tokens is None
    assert stored.reauth_reason
    raw = config.tokens.path.read_bytes()
    assert old.access_token.reveal().encode() not in raw


async def test_transient_token_endpoint_failures_are_retried(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
        await set_knobs(sandbox.url, token_failures=2, token_failure_mode="503")
        new = await asyncio.wait_for(manager.on_rejected(bearer(old)), 30)
        assert new is not None
        assert new != bearer(old)
    await assert_one_refresh_no_reuse(sandbox)


async def test_rejected_client_keeps_tokens(sandbox: RunningSandbox, tmp_path: Path) -> None:
    good = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(good) as manager:
        old = await install_fresh(manager, good)
    bad = sandbox_config(sandbox.url, tmp_path, client_secret="wrong-secret")
    async with running_manager(bad) as manager:
        with pytest.raises(ClientRejected):
            await manager.on_rejected(bearer(old))
        assert manager.tokens is not None
        assert manager.state is TokenState.AUTHORISED
    stored = await FileStore.from_config(good).load()
    assert stored is not None
    assert stored.tokens is not None
    assert stored.tokens.refresh_token == old.refresh_token


async def test_two_managers_on_one_file_never_reuse_a_refresh_token(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as first, running_manager(config) as second:
        old = await install_fresh(first, config)
        await asyncio.sleep(1.05)  # re-reads are throttled to one a second
        await second.authorization()  # picks the tokens up from the shared store
        a, b = await asyncio.gather(first.on_rejected(bearer(old)), second.on_rejected(bearer(old)))
        assert a == b
    await assert_one_refresh_no_reuse(sandbox)


async def test_a_token_another_process_stored_is_found_without_a_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as first, running_manager(config) as second:
        old = await install_fresh(first, config)
        await asyncio.sleep(1.05)  # re-reads are throttled to one a second
        handed_out = await second.authorization()
        assert handed_out == bearer(old)
        assert await second.stored_since(handed_out) is None, "nothing newer yet"
        rotated = await first.on_rejected(bearer(old))  # the other process refreshes
        before = (await get_stats(sandbox.url))["token_requests"]
        assert await second.stored_since(handed_out) == rotated
        assert (await get_stats(sandbox.url))["token_requests"] == before, "no token call"
    await assert_one_refresh_no_reuse(sandbox)


async def test_interrupted_refresh_with_spent_token_reports_it(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
    store = FileStore.from_config(config)
    crashed = await store.load()
    assert crashed is not None
    # Simulate a process that marked the refresh, got new tokens from Pleo, and died
    # before persisting them: the stored refresh token is now spent.
    async with aiohttp.ClientSession() as session:
        from proxy.lifecycle import oauth

        assert old.refresh_token is not None
        await oauth.refresh_tokens(
            session, config.pleo, refresh_token=old.refresh_token, timeout=5, now=time.time()
        )
    await store.save(crashed.evolve(refresh_started_at=time.time()))
    async with running_manager(config) as manager:
        with pytest.raises(ReauthorizationRequired) as caught:
            await manager.on_rejected(bearer(old))
        assert INTERRUPTED_REASON in caught.value.detail
        # It never loops: a second request gets the same answer without calling Pleo.
        before = (await get_stats(sandbox.url))["token_requests"]
        with pytest.raises(ReauthorizationRequired):
            await manager.authorization()
        assert (await get_stats(sandbox.url))["token_requests"] == before


async def test_interrupted_refresh_with_unspent_token_recovers(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        old = await install_fresh(manager, config)
    store = FileStore.from_config(config)
    stored = await store.load()
    assert stored is not None
    await store.save(stored.evolve(refresh_started_at=time.time()))
    async with running_manager(config) as manager:
        new = await manager.on_rejected(bearer(old))
        assert new is not None
        assert manager.state is TokenState.AUTHORISED
    after = await store.load()
    assert after is not None
    assert after.refresh_started_at is None


async def test_idle_connection_gets_a_keepalive_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    base = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    config = replace(base, refresh=Refresh(before_expiry=120, keepalive=1.0))
    async with running_manager(config, background=True) as manager:
        await install_fresh(manager, config)
        deadline = time.monotonic() + 15
        # The manager's own count: it moves only once the new tokens are persisted.
        while manager.status()["refresh_count"] < 1:
            assert time.monotonic() < deadline, "no keep-alive refresh happened"
            await asyncio.sleep(0.2)
        assert (await get_stats(sandbox.url))["refresh_grants"] >= 1


async def test_instance_picks_up_tokens_another_instance_stored(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as waiting, running_manager(config) as other:
        with pytest.raises(ReauthorizationRequired):
            await waiting.authorization()
        tokens = await install_fresh(other, config)
        await asyncio.sleep(1.05)  # re-reads are throttled to one a second
        assert await waiting.authorization() == bearer(tokens)
        assert waiting.state is TokenState.AUTHORISED


async def test_logout_deletes_local_tokens(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config = await authorised_manager_config(sandbox, tmp_path, ttl=300)
    async with running_manager(config) as manager:
        await install_fresh(manager, config)
        await manager.logout()
        assert manager.state is TokenState.UNAUTHORISED
    assert await FileStore.from_config(config).load() is None


async def aiohttp_post(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        assert resp.status == 200


async def minted(sandbox: RunningSandbox, count: int) -> list[TokenSet]:
    """`count` grants, their access tokens already expired here (Pleo does not mind)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sandbox.url}/_sandbox/mint", json={"count": count, "ttl_min": 60, "ttl_max": 60}
        ) as resp,
    ):
        grants = (await resp.json())["grants"]
    past = time.time() - 3600
    return [parse_token_response(g, now=past, requested_scopes=()) for g in grants]


async def marked(stores: ConnectionStores, names: list[str]) -> bool:
    """Each connection's refresh is past its mark: at the limiter, or done."""
    for name in names:
        stored = await stores.store(name).load()
        if stored is None or (stored.refresh_started_at is None and not stored.refresh_count):
            return False
    return True


async def test_a_request_joining_a_queued_background_refresh_is_not_queued_behind_the_others(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """A refresh storm: background refreshes of many connections wait at the limiter (one
    slow call at a time). A request for the last one queued joins its refresh, and is
    answered long before the queue drains."""
    config = sandbox_config(sandbox.url, tmp_path)
    await set_knobs(sandbox.url, token_latency=0.1)  # the queue drains in ~3 s
    names = [f"c{index:02d}" for index in range(30)]
    limiter = TokenLimiter(1)
    stores = open_stores(config)
    async with aiohttp.ClientSession() as session:
        managers = [
            TokenManager(config, stores.store(name), session, name=name, limiter=limiter)
            for name in names
        ]
        try:
            for manager, tokens in zip(managers, await minted(sandbox, len(names)), strict=True):
                await manager.start(background=False, verify=False)
                await manager.install(tokens)
            *others, target = managers
            queued = [asyncio.create_task(m.refresh_in_background()) for m in others]
            await wait_until(lambda: marked(stores, names[:-1]))
            joined = asyncio.create_task(target.refresh_in_background())
            await wait_until(lambda: marked(stores, names[-1:]))
            done_before = sum(task.done() for task in queued)
            header = await asyncio.wait_for(target.authorization(), 10)
            done_after = sum(task.done() for task in queued)
            assert target.tokens is not None
            assert header == bearer(target.tokens)
            # The call in flight ends, then this one goes: not the ~25 still queued first.
            assert done_after - done_before <= 3, (done_before, done_after)
            assert done_after < len(others) // 2, "answered before the queue drained"
            results = await asyncio.wait_for(asyncio.gather(*queued, joined), 30)
            assert all(results)
        finally:
            for manager in managers:
                await manager.close()
            await stores.close()
    stats = await get_stats(sandbox.url)
    assert stats["refresh_grants"] == len(names), "the request shared the background refresh"
    assert stats["reuse_detected"] == 0
    assert stats["token_in_flight_max"] == 1
