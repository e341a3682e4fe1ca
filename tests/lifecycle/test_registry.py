"""The registry of connections, on a real file store and the sandbox's real tokens:
lookups, discovery of what other processes did, duplicates, deletion, isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Config, Connections, ConnectionSpec
from proxy.errors import StoreError
from proxy.lifecycle.clocks import steady_clock
from proxy.lifecycle.known import MISS_INTERVAL
from proxy.lifecycle.registry import Registry
from proxy.lifecycle.rules import TokenState
from proxy.store import open_stores
from tests.flows import grant_tokens, sandbox_config
from tests.sandboxes import RunningSandbox, sandbox, set_knobs

__all__ = ["sandbox"]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def config_for(sandbox: RunningSandbox, tmp_path: Path, *names: str) -> Config:
    base = sandbox_config(sandbox.url, tmp_path)
    specs = tuple(ConnectionSpec(name) for name in names)
    return replace(base, connections=Connections(configured=specs, implicit_default=False))


@asynccontextmanager
async def registry_for(
    config: Config, clock: Clock | None = None, *, steady: Clock | None = None
) -> AsyncIterator[Registry]:
    stores = open_stores(config)
    async with aiohttp.ClientSession() as session:
        registry = Registry(
            config, stores, session, clock=clock or time.time, steady=steady or steady_clock
        )
        await registry.start(background=False)
        try:
            yield registry
        finally:
            await registry.close()
            await stores.close()


async def test_configured_connections_exist_and_others_only_with_an_entry(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path, "acme")
    async with registry_for(config) as registry:
        assert registry.names() == ["acme"]
        assert registry.get("acme") is not None
        assert await registry.find("nosuch") is None
        assert await registry.find("../../etc") is None
        manager, created = await registry.create("made")
        assert created
        assert manager.state is TokenState.UNAUTHORISED
        assert (tmp_path / "connections" / "made.enc").exists()
        again, created = await registry.create("made")
        assert (again, created) == (manager, False)
    async with registry_for(config) as reopened:
        assert reopened.names() == ["acme", "made"], "a created connection outlives the process"


async def test_an_unknown_name_is_looked_up_in_the_store_at_most_once_a_second(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path)
    wall, steady = Clock(), Clock()
    async with registry_for(config, wall, steady=steady) as mine, registry_for(config) as other:
        assert await mine.find("later") is None
        await other.create("later")
        assert await mine.find("later") is None, "the miss is remembered"
        # Measured on the steady clock: a wall clock stepped back does not stretch it.
        wall.now -= 3600
        steady.now += MISS_INTERVAL
        found = await mine.find("later")
        assert found is not None
        assert found.name == "later"


async def test_concurrent_first_uses_share_one_manager(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path)
    async with registry_for(config) as mine, registry_for(config) as other:
        await other.create("busy")
        managers = await asyncio.gather(*(mine.find("busy") for _ in range(100)))
        assert len({id(m) for m in managers}) == 1
        assert managers[0] is not None


async def test_sync_brings_in_what_other_processes_did(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path, "fixed")
    await set_knobs(sandbox.url, auto_approve=True, redirect_uris=[config.pleo.redirect_uri])
    async with registry_for(config) as mine, registry_for(config) as other:
        await other.create("new")
        await other.install("fixed", await grant_tokens(config, now=time.time()))
        await mine.sync()
        assert mine.names() == ["fixed", "new"]
        fixed = mine.get("fixed")
        assert fixed is not None
        assert fixed.state is TokenState.AUTHORISED, "tokens stored elsewhere are taken"
        await other.delete("new")
        await other.delete("fixed")
        await mine.sync()
        assert mine.names() == ["fixed"], "a configured connection stays"
        assert fixed.state.value == "unauthorised"
        assert fixed.tokens is None


async def test_the_same_subject_twice_is_reported(sandbox: RunningSandbox, tmp_path: Path) -> None:
    """The sandbox gives every grant the same company unless told otherwise."""
    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, auto_approve=True, redirect_uris=[config.pleo.redirect_uri])
    subject = "urn:pleo:company:same"
    async with registry_for(config) as registry:
        first = await registry.install(
            "first", await grant_tokens(config, now=time.time()), subject=subject
        )
        second = await registry.install(
            "second", await grant_tokens(config, now=time.time()), subject=subject
        )
        assert "same_subject_as" not in first.status()
        assert second.status()["same_subject_as"] == ["first"]


async def test_an_unreadable_connection_harms_no_other(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path)
    await set_knobs(sandbox.url, auto_approve=True, redirect_uris=[config.pleo.redirect_uri])
    async with registry_for(config) as registry:
        await registry.install("good", await grant_tokens(config, now=time.time()))
        await registry.create("broken")
    (tmp_path / "connections" / "broken.enc").write_bytes(b"\x00garbage")
    async with registry_for(config) as registry:
        assert registry.names() == ["broken", "good"], "both exist; neither is read at start"
        assert registry.get("good") is None
        good = await registry.find("good")
        assert good is not None
        assert good.state is TokenState.AUTHORISED
        with pytest.raises(StoreError):
            await registry.find("broken")


async def test_idle_connections_beyond_the_cache_are_dropped_and_read_again(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = config_for(sandbox, tmp_path)
    config = replace(config, connections=replace(config.connections, cache=10))
    await set_knobs(sandbox.url, auto_approve=True, redirect_uris=[config.pleo.redirect_uri])
    async with registry_for(config) as registry:
        for index in range(30):
            await registry.install(f"c{index:02d}", await grant_tokens(config, now=time.time()))
        assert len(registry.managers()) <= 10, "least recently used ones were dropped"
        assert len(registry) == 30, "all still exist"
        first = await registry.find("c00")
        assert first is not None
        assert first.state is TokenState.AUTHORISED, "read again from the store"
        assert (await first.authorization()).reveal().startswith("Bearer ")
