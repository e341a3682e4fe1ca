"""The one refresh scheduler: real managers on a real store against the sandbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp

from proxy.config import Config, Connections, Refresh
from proxy.lifecycle.clocks import steady_clock
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.registry import Registry
from proxy.lifecycle.rules import Due, refresh_due, spread
from proxy.lifecycle.scheduler import MAX_SLEEP, RefreshScheduler
from proxy.store import open_stores
from tests.clocks import Shifted
from tests.flows import sandbox_config
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]

COUNT = 300
HOUR = 3600.0


def config_for(sandbox: RunningSandbox, tmp_path: Path) -> Config:
    base = sandbox_config(sandbox.url, tmp_path, before_expiry=120)
    return replace(
        base,
        connections=Connections(implicit_default=False),
        refresh=replace(base.refresh, max_concurrent=3),
    )


@asynccontextmanager
async def registry_for(config: Config, *, background: bool) -> AsyncIterator[Registry]:
    stores = open_stores(config)
    async with aiohttp.ClientSession() as session:
        registry = Registry(config, stores, session)
        await registry.start(background=background)
        try:
            yield registry
        finally:
            await registry.close()
            await stores.close()


async def mint(
    sandbox: RunningSandbox, count: int, low: float, high: float
) -> list[dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sandbox.url}/_sandbox/mint", json={"count": count, "ttl_min": low, "ttl_max": high}
        ) as resp,
    ):
        grants: list[dict[str, object]] = (await resp.json())["grants"]
        return grants


async def test_hundreds_of_connections_are_refreshed_by_a_few_workers(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    from proxy.lifecycle.oauth import parse_token_response

    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, access_ttl=60, latency=0.02)
    grants = await mint(sandbox, COUNT, 3, 6)
    async with registry_for(config, background=False) as cli:
        for index, grant in enumerate(grants):
            tokens = parse_token_response(grant, now=time.time(), requested_scopes=())
            await cli.install(f"c{index:03d}", tokens, notify=False)
    async with registry_for(config, background=True) as registry:
        for index in range(COUNT):  # in use: proactive refresh applies
            manager = await registry.find(f"c{index:03d}")
            assert manager is not None
            await manager.authorization()
        names = [task.get_name() for task in asyncio.all_tasks()]
        assert "token-refresh" not in names, "no background task per connection"
        assert sum(name.startswith("refresh-") for name in names) == 3, "max_concurrent workers"

        async def all_refreshed() -> bool:
            return bool((await get_stats(sandbox.url))["refresh_grants"] >= COUNT)

        deadline = time.monotonic() + 30
        while not await all_refreshed():
            assert time.monotonic() < deadline, "the scheduler fell behind"
            await asyncio.sleep(0.2)
        for index in range(COUNT):
            manager = registry.get(f"c{index:03d}")
            assert manager is not None
            current = manager.tokens
            assert current is not None
            assert current.expires_at - time.time() > 30, "refreshed before it expired"
    stats = await get_stats(sandbox.url)
    assert stats["reuse_detected"] == 0
    assert stats["token_in_flight_max"] <= 3


def test_jitter_spreads_due_times_but_keeps_them_before_the_margin() -> None:
    from proxy.secret import Secret
    from proxy.tokenset import StoredState, TokenSet

    refresh = Refresh(before_expiry=60)
    dues: list[Due] = []
    tokens = TokenSet(Secret("a"), Secret("r"), expires_at=1000.0, lifetime=600)
    for i in range(200):
        tokens = TokenSet(Secret("a"), Secret("r"), expires_at=1000.0 + i / 1000, lifetime=600)
        stored = StoredState(tokens=tokens, obtained_at=400.0)
        due = refresh_due(stored, refresh, now=500.0, last_used=500.0, jitter=True)
        assert due is not None
        assert not due.keepalive
        assert 1000 - 60 - 15 <= due.at <= 1000 + 1 - 60
        dues.append(due)
    assert len({round(d.at) for d in dues}) > 5, "not all in the same second"
    assert 0 <= spread(123.0, 10) < 10
    idle = refresh_due(
        StoredState(tokens=tokens, obtained_at=400.0), refresh, now=500.0, last_used=-1e9
    )
    assert idle is not None
    assert idle.keepalive, "an idle connection is only kept alive"


@asynccontextmanager
async def watched_scheduler(
    wall: Callable[[], float], steady: Callable[[], float]
) -> AsyncIterator[tuple[RefreshScheduler, list[str]]]:
    """A scheduler whose workers only record which connection came due (none is loaded)."""
    asked: list[str] = []

    async def lookup(name: str) -> TokenManager | None:
        asked.append(name)
        return None

    scheduler = RefreshScheduler(lookup, clock=wall, steady=steady, workers=2)
    await scheduler.start()
    try:
        yield scheduler, asked
    finally:
        await scheduler.close()


async def until_asked(asked: list[str], *, within: float) -> None:
    deadline = time.monotonic() + within
    while not asked:
        assert time.monotonic() < deadline, "the due time was not noticed"
        await asyncio.sleep(0.02)


async def test_due_times_are_kept_on_the_steady_clock() -> None:
    wall, steady = Shifted(time.time), Shifted(steady_clock)
    async with watched_scheduler(wall, steady) as (scheduler, asked):
        scheduler.schedule("c", Due(wall() + 0.3, keepalive=False))
        due = scheduler.due_of("c")
        assert due is not None
        assert abs(due - (wall() + 0.3)) < 0.05
        wall.offset = -HOUR  # NTP steps the wall clock back an hour
        due = scheduler.due_of("c")
        assert due is not None
        assert abs(due - (wall() + 0.3)) < 0.05, "moved with the wall clock: still 0.3 s away"
        await until_asked(asked, within=2.0)
        assert asked == ["c"]


async def test_a_resume_after_a_suspend_is_noticed_within_the_longest_sleep() -> None:
    # The loop's timers do not count a suspend: only the steady clock and the wall clock
    # jump. A worker asleep until a due time an hour away must still look again soon.
    wall, steady = Shifted(time.time), Shifted(steady_clock)
    async with watched_scheduler(wall, steady) as (scheduler, asked):
        scheduler.schedule("c", Due(wall() + HOUR, keepalive=True))
        await asyncio.sleep(0.1)  # the workers are asleep now, waiting for it
        assert asked == []
        wall.offset = steady.offset = HOUR + 1
        started = time.monotonic()
        await until_asked(asked, within=MAX_SLEEP + 1.0)
        assert time.monotonic() - started <= MAX_SLEEP + 0.5
        assert asked == ["c"]
