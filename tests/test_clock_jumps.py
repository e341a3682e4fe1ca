"""Clock jumps (issue 10 item 4): a resume after a suspend, a wall clock stepped back or
forward. The proxy's app on a loopback port, the real sandbox, clocks shifted by hand.

The loop's own timers (CLOCK_MONOTONIC) are never shifted: after a real suspend they
have not moved either. Traffic pauses for the instant of a jump only: a request in flight
across a real suspend carries a token that expired meanwhile whatever the proxy does.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config import Config, Connections
from proxy.http.app import build_app, runner_options
from proxy.lifecycle.clocks import steady_clock
from proxy.lifecycle.oauth import parse_token_response
from proxy.lifecycle.registry import Registry
from proxy.store import open_stores
from tests.clocks import Shifted
from tests.flows import sandbox_config
from tests.processes import free_port
from tests.sandboxes import RunningSandbox, get_grants, get_stats, reset_stats, sandbox, set_knobs

__all__ = ["sandbox"]

HOUR = 3600.0
MAX_CONCURRENT = 4
CLIENTS = 16
TIMEOUT = aiohttp.ClientTimeout(total=20)


def config_for(sandbox: RunningSandbox, tmp_path: Path) -> Config:
    """Connections made at run time only (as a partner's), the token calls capped."""
    base = sandbox_config(sandbox.url, tmp_path, port=free_port(), before_expiry=120)
    return replace(
        base,
        connections=Connections(implicit_default=False),
        refresh=replace(base.refresh, max_concurrent=MAX_CONCURRENT),
    )


async def connections_with_tokens(
    sandbox: RunningSandbox, config: Config, count: int, *, ttl: tuple[float, float]
) -> list[str]:
    """`count` connections, each a minted grant whose first token lives `ttl` seconds."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        body = {"count": count, "ttl_min": ttl[0], "ttl_max": ttl[1]}
        async with session.post(f"{sandbox.url}/_sandbox/mint", json=body) as resp:
            grants = (await resp.json())["grants"]
    names = [f"c{index:03d}" for index in range(count)]
    stores = open_stores(config)
    try:
        async with aiohttp.ClientSession() as session:
            registry = Registry(config, stores, session)
            await registry.start(background=False)
            try:
                for name, grant in zip(names, grants, strict=True):
                    tokens = parse_token_response(grant, now=time.time())
                    await registry.install(name, tokens, notify=False)
            finally:
                await registry.close()
    finally:
        await stores.close()
    return names


@asynccontextmanager
async def proxy(
    config: Config, *, clock: Callable[[], float], steady: Callable[[], float] | None = None
) -> AsyncIterator[str]:
    """The proxy's app on its port (its steady clock the real one unless given); its URL."""
    if steady is None:
        app = build_app(config, clock=clock)
    else:
        app = build_app(config, clock=clock, steady=steady)
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", config.listen.port).start()
        yield f"http://127.0.0.1:{config.listen.port}"
    finally:
        await runner.cleanup()


class Clients:
    """`CLIENTS` clients on kept-alive connections, taking connection names in turn."""

    def __init__(self, session: aiohttp.ClientSession, url: str, names: list[str]) -> None:
        self._session = session
        self._url = f"{url}/v1/introspect"
        self._names = names
        self.results: collections.Counter[str] = collections.Counter()

    async def run(self, *, seconds: float, covering: bool = False, limit: float = 15.0) -> float:
        """Send requests for `seconds` (after every connection had a 200, with
        `covering`, which must happen within `limit`); returns when that coverage was."""
        shuffled = random.Random(7).sample(self._names, len(self._names))
        turn = itertools.cycle(shuffled)
        answered: set[str] = set()
        started = time.monotonic()
        covered = started if not covering else None
        deadline = started + limit

        async def client() -> None:
            nonlocal covered
            while True:
                now = time.monotonic()
                if covered is not None and now > covered + seconds:
                    return
                assert now < deadline, f"{len(answered)} of {len(self._names)} answered"
                name = next(turn)
                headers = {"X-Pleo-Connection": name}
                async with self._session.get(self._url, headers=headers) as resp:
                    await resp.read()
                    self.results[str(resp.status)] += 1
                    if resp.status == 200:
                        answered.add(name)
                if covered is None and len(answered) == len(self._names):
                    covered = time.monotonic()

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        assert covered is not None
        return covered - started


async def test_a_resume_after_a_suspend_refreshes_each_connection_once_within_the_cap(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    world = Shifted(time.monotonic)  # the sandbox's clock: Pleo's time moves on
    sandbox.state.clock = world
    wall, steady = Shifted(time.time), Shifted(steady_clock)
    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, access_ttl=HOUR)
    names = await connections_with_tokens(sandbox, config, 200, ttl=(1800, 3000))
    # Token calls take a while, as over the internet: they would pile up unless capped.
    await set_knobs(sandbox.url, token_latency=0.05)
    async with (
        proxy(config, clock=wall, steady=steady) as url,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        clients = Clients(session, url, names)
        await clients.run(seconds=0.5, covering=True)  # every connection in use
        assert (await get_stats(sandbox.url))["refresh_grants"] == 0
        await reset_stats(sandbox.url)
        # The host slept an hour: every token expired meanwhile, by Pleo's clock and both
        # of the proxy's; the loop's monotonic clock did not move.
        world.offset = wall.offset = steady.offset = HOUR
        took = await clients.run(seconds=1.0, covering=True)
    stats = await get_stats(sandbox.url)
    assert set(clients.results) == {"200"}, clients.results
    assert stats["expired_tokens"] == 0, "a token Pleo considers expired was forwarded"
    assert 0 < stats["token_in_flight_max"] <= MAX_CONCURRENT
    assert [g["refreshes"] for g in await get_grants(sandbox.url)] == [1] * 200, "once each"
    assert stats["reuse_detected"] == 0
    # 200 calls of 0.05 s, 4 at a time, take 2.5 s at the least.
    assert took < 10.0


async def test_a_wall_clock_stepped_back_keeps_refreshes_on_time(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    lifetime = 4  # seconds; refreshed half a lifetime before expiry (before_expiry 120)
    wall = Shifted(time.time)  # the proxy's wall clock only; its steady clock is the real one
    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, access_ttl=lifetime)
    names = await connections_with_tokens(sandbox, config, 4, ttl=(lifetime, lifetime))
    async with (
        proxy(config, clock=wall) as url,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        clients = Clients(session, url, names)
        await clients.run(seconds=0, covering=True)
        wall.offset = -HOUR  # NTP steps the proxy's clock back an hour; Pleo's is right
        await clients.run(seconds=3 * lifetime)
    stats = await get_stats(sandbox.url)
    assert set(clients.results) == {"200"}, clients.results
    assert stats["expired_tokens"] == 0, "a token Pleo considers expired was forwarded"
    # At least one refresh per lifetime, for every connection: none waited for the hour.
    assert all(g["refreshes"] >= 3 for g in await get_grants(sandbox.url))
    assert stats["reuse_detected"] == 0


async def test_a_wall_clock_stepped_forward_refreshes_at_once_within_the_cap(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    wall = Shifted(time.time)
    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, access_ttl=HOUR)
    names = await connections_with_tokens(sandbox, config, 50, ttl=(1800, 3000))
    await set_knobs(sandbox.url, token_latency=0.05)
    async with (
        proxy(config, clock=wall) as url,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        clients = Clients(session, url, names)
        await clients.run(seconds=0.5, covering=True)
        await reset_stats(sandbox.url)
        # Every token looks expired now; Pleo's clock did not move, so it is early, and safe.
        wall.offset = HOUR
        took = await clients.run(seconds=1.0, covering=True)
    stats = await get_stats(sandbox.url)
    assert set(clients.results) == {"200"}, clients.results
    assert stats["expired_tokens"] == 0
    assert 0 < stats["token_in_flight_max"] <= MAX_CONCURRENT
    assert [g["refreshes"] for g in await get_grants(sandbox.url)] == [1] * 50, "once each"
    assert took < 5.0
