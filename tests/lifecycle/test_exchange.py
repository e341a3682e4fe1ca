"""Refreshing through the refresh helper: a real helper process, the sandbox, a token file.

The token manager is given an `Exchanger`; the helper it starts takes the store lock,
calls the sandbox and persists. Signals (SIGSTOP, SIGKILL) show where the work happens
and what a helper that dies costs: a retry, or the honest "a refresh was interrupted".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Config, load_config
from proxy.errors import ReauthorizationRequired, StoreError
from proxy.lifecycle.exchange import Exchanger
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.rules import INTERRUPTED_REASON, TokenEvents, TokenState, bearer
from proxy.store import open_stores
from proxy.store.crypto import format_key, generate_key
from proxy.store.file import FileStore
from proxy.tokenset import StoredState, TokenSet
from tests.connections import wait_until
from tests.flows import grant_tokens, sandbox_config
from tests.lifecycle.test_manager import marked, minted
from tests.processes import PLEO_PROXY, children, free_port, import_tokens, wait_for, write_config
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs
from tests.test_faults import file_size_limit

__all__ = ["sandbox"]


class Counted(TokenEvents):
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.lock_waits = 0

    def refreshed(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def lock_waited(self, seconds: float) -> None:
        self.lock_waits += 1


@asynccontextmanager
async def helped(
    config: Config,
    exchanger: Exchanger,
    *,
    events: TokenEvents | None = None,
    store: FileStore | None = None,
) -> AsyncIterator[TokenManager]:
    """A started token manager whose refreshes go through `exchanger`; both closed after."""
    store = store if store is not None else FileStore.from_config(config)
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(config, store, session, events=events, exchanger=exchanger)
        await manager.start(background=False)
        exchanger.start_soon()
        try:
            yield manager
        finally:
            await manager.close()
            await exchanger.close()
            await store.close()


async def seeded(
    sandbox: RunningSandbox, tmp_path: Path, store: FileStore | None = None
) -> tuple[Config, TokenSet]:
    config = sandbox_config(sandbox.url, tmp_path)
    tokens = await grant_tokens(config, now=time.time())
    store = store if store is not None else FileStore.from_config(config)
    await store.save(StoredState(tokens=tokens, obtained_at=time.time()))
    return config, tokens


async def stored(config: Config) -> StoredState:
    store = FileStore.from_config(config)
    try:
        state = await store.load()
    finally:
        await store.close()
    assert state is not None
    return state


async def until_token_request(sandbox: RunningSandbox, seen: int) -> None:
    """Until the sandbox's token endpoint has received a request beyond `seen`."""
    async with asyncio.timeout(20):
        while sandbox.state.stats.token_requests <= seen:
            await asyncio.sleep(0.01)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    """Exited (a zombie its parent has yet to reap counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def running_helper(exchanger: Exchanger) -> int:
    assert await exchanger.ready()
    pid = exchanger.pid
    assert pid is not None
    assert pid != os.getpid()
    return pid


async def test_a_refresh_runs_in_the_helper_and_is_counted_here(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    events = Counted()
    exchanger = Exchanger(config)
    async with helped(config, exchanger, events=events) as manager:
        pid = await running_helper(exchanger)
        os.kill(pid, signal.SIGSTOP)
        try:
            refresh = asyncio.create_task(manager.on_rejected(bearer(old)))
            await asyncio.sleep(0.5)
            # Stopped helper, stopped refresh: the lock, Pleo and the write are over there.
            assert not refresh.done()
            assert sandbox.state.stats.refresh_grants == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        new = await asyncio.wait_for(refresh, 20)
        assert manager.state is TokenState.AUTHORISED
    assert gone(pid)  # closing our end ended it
    state = await stored(config)
    assert state.tokens is not None
    assert new == bearer(state.tokens) != bearer(old)
    assert (state.refresh_count, state.refresh_started_at) == (1, None)
    # The helper's counts are counted here, where the metrics are.
    assert (events.outcomes, events.lock_waits) == (Counter({"ok": 1}), 1)
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (1, 0)


async def test_no_secret_reaches_the_helpers_command_line_or_environment(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    key = format_key(generate_key()).decode()
    environ = {**os.environ, "PLEO_PROXY_KEY": key, "SOME_SECRET": "s3cret-value"}
    config = sandbox_config(sandbox.url, tmp_path)
    store = FileStore(config.tokens.path, key_file=config.tokens.key_file, environ=environ)
    config, old = await seeded(sandbox, tmp_path, store)
    assert config.pleo.client_secret is not None
    exchanger = Exchanger(config, environ=environ)
    async with helped(config, exchanger, store=store) as manager:
        pid = await running_helper(exchanger)
        # Sealed with PLEO_PROXY_KEY and no key file: the helper got the key by the socket.
        assert await manager.on_rejected(bearer(old)) is not None
        exposed = (
            Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        )
        assert os.getsid(pid) == os.getpgid(pid) == pid  # its own session and group
    for secret in (key, "s3cret-value", config.pleo.client_secret.reveal(), "PLEO_PROXY_KEY"):
        assert secret.encode() not in exposed
    assert not config.tokens.key_file.exists()
    assert (await get_stats(sandbox.url))["refresh_grants"] == 1


@pytest.mark.parametrize("command", [["/bin/false"], ["/nonexistent/python3"]])
async def test_without_a_helper_the_refresh_runs_in_this_process(
    sandbox: RunningSandbox, tmp_path: Path, command: list[str]
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    exchanger = Exchanger(config, command=command)
    async with helped(config, exchanger) as manager:
        assert not await exchanger.ready()
        assert await manager.on_rejected(bearer(old)) is not None
        assert manager.state is TokenState.AUTHORISED
    assert (await stored(config)).refresh_count == 1
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (1, 0)


async def test_a_helper_that_died_idle_is_started_again(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    exchanger = Exchanger(config)
    async with helped(config, exchanger) as manager:
        pid = await running_helper(exchanger)
        os.kill(pid, signal.SIGKILL)
        await until(lambda: exchanger.pid is None)  # its end of the socket closed
        assert await manager.on_rejected(bearer(old)) is not None
        assert exchanger.pid not in (None, pid)
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (1, 0)


async def test_a_helper_killed_in_an_exchange_ends_as_an_interrupted_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """Helper and request die together (the cgroup-wide kill): nothing can save the tokens
    Pleo rotated. The retry presents the stored token once, and the grant ends honestly."""
    config, old = await seeded(sandbox, tmp_path)
    exchanger = Exchanger(config)
    async with helped(config, exchanger) as manager:
        pid = await running_helper(exchanger)
        await set_knobs(sandbox.url, token_latency=1.0)
        seen = sandbox.state.stats.token_requests
        refresh = asyncio.create_task(manager.on_rejected(bearer(old)))
        await until_token_request(sandbox, seen)
        os.kill(pid, signal.SIGKILL)  # the sandbox rotates all the same, 1 s later
        with pytest.raises(ReauthorizationRequired) as caught:
            await asyncio.wait_for(refresh, 30)
        assert INTERRUPTED_REASON in caught.value.detail
        assert exchanger.pid not in (None, pid)  # a new helper made the one retry
        calls = sandbox.state.stats.token_requests
        with pytest.raises(ReauthorizationRequired):
            await manager.authorization()
        assert sandbox.state.stats.token_requests == calls  # no loop
    state = await stored(config)
    assert (state.tokens, state.reauth_reason) == (None, INTERRUPTED_REASON)
    assert (await get_stats(sandbox.url))["reuse_detected"] == 1


def descriptors(pid: int) -> dict[int, str]:
    """What each open descriptor of `pid` refers to (file, socket:[inode], pipe:[inode])."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return found


async def test_a_running_proxys_helper_holds_none_of_its_descriptors(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    port = free_port()
    config_file = write_config(
        tmp_path / "proxy.yaml", sandbox_url=sandbox.url, port=port, state_dir=tmp_path / "state"
    )
    tokens = await grant_tokens(load_config(config_file), now=time.time())
    await asyncio.to_thread(import_tokens, config_file, tokens)
    proxy = subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/readyz")
        await until(lambda: len(children(proxy.pid)) == 1)
        (helper,) = children(proxy.pid)
        await until(lambda: len(descriptors(helper)) > 4)  # its own event loop is up
        theirs = {
            target
            for fd, target in descriptors(helper).items()
            if fd > 2 and not target.startswith("anon_inode:")  # epoll: one per process
        }
        ours = descriptors(proxy.pid)
        assert any(target.startswith("socket:") for target in ours.values())  # the listener
        # Not the listening socket, the token file's lock, or anything else of the proxy's.
        assert theirs & set(ours.values()) == set()
        assert os.getsid(helper) == helper != os.getsid(proxy.pid)
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)  # the proxy's whole group: not its helper
        proxy.wait(timeout=10)


def busy(manager: TokenManager) -> bool:
    return manager.busy


async def test_a_result_the_helper_keeps_never_outlives_a_deletion(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """Pleo answered while the disk was full: the helper keeps the new tokens to write
    later. The connection is deleted meanwhile; the helper is told, and never writes them
    back (not at its next run, not at exit)."""
    config, old = await seeded(sandbox, tmp_path)
    exchanger = Exchanger(config)
    async with helped(config, exchanger) as manager:
        pid = await running_helper(exchanger)
        await set_knobs(sandbox.url, token_latency=1.0)
        seen = sandbox.state.stats.token_requests
        refresh = asyncio.create_task(manager.on_rejected(bearer(old)))
        await until_token_request(sandbox, seen)
        with file_size_limit(pid, 64):
            with pytest.raises(StoreError):
                await asyncio.wait_for(refresh, 20)
            assert busy(manager)  # the kept tokens are due to be written
        await manager.forget()
        assert not busy(manager)
    assert await FileStore.from_config(config).load() is None  # still deleted
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (1, 0)


async def test_a_request_joining_a_refresh_queued_in_the_helper_goes_first(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """As without a helper: the helper's limiter hears that a request joined a queued
    background refresh, and lets it go before the other connections' ones."""
    config = sandbox_config(sandbox.url, tmp_path)
    config = replace(config, refresh=replace(config.refresh, max_concurrent=1))
    await set_knobs(sandbox.url, token_latency=0.1)  # the helper's queue drains in ~3 s
    names = [f"c{index:02d}" for index in range(30)]
    exchanger = Exchanger(config)
    stores = open_stores(config)
    async with aiohttp.ClientSession() as session:
        managers = [
            TokenManager(config, stores.store(name), session, name=name, exchanger=exchanger)
            for name in names
        ]
        try:
            assert await exchanger.ready()
            for manager, tokens in zip(managers, await minted(sandbox, len(names)), strict=True):
                await manager.start(background=False, verify=False)
                await manager.install(tokens)
            *others, target = managers
            queued = [asyncio.create_task(m.refresh_in_background()) for m in others]
            await wait_until(lambda: marked(stores, names[:-1]))
            joined = asyncio.create_task(target.refresh_in_background())
            await wait_until(lambda: marked(stores, names[-1:]))
            done_before = sum(task.done() for task in queued)
            await asyncio.wait_for(target.authorization(), 10)
            done_after = sum(task.done() for task in queued)
            assert done_after - done_before <= 3, (done_before, done_after)
            results = await asyncio.wait_for(asyncio.gather(*queued, joined), 30)
            assert all(results)
        finally:
            for manager in managers:
                await manager.close()
            await exchanger.close()
            await stores.close()
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (len(names), 0)
    assert stats["token_in_flight_max"] == 1


async def test_a_helper_started_early_and_never_asked_is_stopped_at_close(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    # A proxy that never refreshed while it ran (the helper started at start-up, no
    # refresh came): closing must still end the helper and reap it.
    config, _ = await seeded(sandbox, tmp_path)
    exchanger = Exchanger(config)
    exchanger.start_soon()
    starting = exchanger._starting  # the background start itself: nothing else awaits it
    assert starting is not None
    await asyncio.wait_for(asyncio.shield(starting), 20)
    helpers = children(os.getpid())
    assert len(helpers) == 1
    await exchanger.close()
    await until(lambda: gone(helpers[0]))
    assert children(os.getpid()) == []  # reaped, not left a zombie
