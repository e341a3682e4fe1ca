"""The refresh helper process on its own: the test plays its proxy over the socketpair.

A real `python -m proxy.lifecycle.exchanger`, the sandbox and a token file. What is
checked is the helper's contract: it finishes an exchange whose proxy went away (and
persists it), drops runs still waiting for the lock, ignores the stop signal until its
proxy's end closes, and never outlives its last exchange by more than the token-request
timeout.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, Timeouts
from proxy.errors import StoreError
from proxy.lifecycle import wire
from proxy.lifecycle.exchange import HELPER_MODULE
from proxy.lifecycle.exchanger import WRITE_GRACE
from proxy.lifecycle.rules import Wanted, bearer, token_digest
from proxy.store.file import FileStore
from proxy.tokenset import StoredState, TokenSet
from tests.flows import grant_tokens, sandbox_config
from tests.sandboxes import RunningSandbox, sandbox, set_knobs
from tests.test_faults import file_size_limit

__all__ = ["sandbox"]


@dataclass
class Helper:
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, doc: dict[str, Any]) -> None:
        await wire.send(self.writer, doc)

    async def hello(self, config: Config) -> dict[str, Any]:
        await self.send(wire.settings_doc(wire.Settings(config, {}, log_format="json")))
        answer = await asyncio.wait_for(wire.receive(self.reader), 20)
        assert answer is not None
        return answer

    async def ask(self, wanted: Wanted, *, request_id: int = 1, token_request: float = 5.0) -> None:
        """Refresh `default` unless the store holds what `wanted` asks for."""
        request = wire.Request(request_id, "default", wanted, token_request)
        await self.send(wire.request_doc(request))

    def vanish(self) -> None:
        """Our end is gone at once, unflushed: what a SIGKILL of the proxy does."""
        self.writer.transport.abort()

    async def exited_within(self, seconds: float) -> int:
        return await asyncio.wait_for(self.process.wait(), seconds)

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


@asynccontextmanager
async def helper_process() -> AsyncIterator[Helper]:
    ours, theirs = socket.socketpair()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        HELPER_MODULE,
        str(theirs.fileno()),
        pass_fds=(theirs.fileno(),),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    try:
        yield Helper(process, reader, writer)
    finally:
        writer.close()
        if process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


async def seeded(sandbox: RunningSandbox, tmp_path: Path) -> tuple[Config, TokenSet]:
    config = sandbox_config(sandbox.url, tmp_path)
    tokens = await grant_tokens(config, now=time.time())
    store = FileStore.from_config(config)
    await store.save(StoredState(tokens=tokens, obtained_at=time.time()))
    return config, tokens


async def stored(config: Config) -> StoredState:
    state = await FileStore.from_config(config).load()
    assert state is not None
    return state


def rejected(tokens: TokenSet) -> Wanted:
    """What a proxy asks after Pleo answered 401 to `tokens`."""
    return Wanted(rejected=token_digest(bearer(tokens)), mine=token_digest(tokens.access_token))


async def until_token_request(sandbox: RunningSandbox, seen: int = 0) -> None:
    async with asyncio.timeout(20):
        while sandbox.state.stats.token_requests <= seen:
            await asyncio.sleep(0.01)


async def test_it_finishes_and_persists_the_exchange_of_a_proxy_that_went_away(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    await set_knobs(sandbox.url, token_latency=1.0)
    async with helper_process() as helper:
        assert (await helper.hello(config))["ready"] is True
        seen = sandbox.state.stats.token_requests
        await helper.ask(rejected(old))
        await until_token_request(sandbox, seen)
        helper.vanish()
        gone_at = time.monotonic()
        assert await helper.exited_within(config.timeouts.token_request + WRITE_GRACE) == 0
        # It waited for Pleo's answer (1 s), wrote it, and left at once.
        assert 0.5 < time.monotonic() - gone_at < 3.0
        errors = await helper.stderr()
    state = await stored(config)
    assert state.tokens is not None
    assert state.tokens.access_token != old.access_token
    assert (state.refresh_count, state.refresh_started_at) == (1, None)
    stats = sandbox.state.stats
    assert (stats.refresh_grants, stats.reuse_detected) == (1, 0)
    assert "Traceback" not in errors
    assert state.tokens.refresh_token is not None
    assert state.tokens.refresh_token.reveal() not in errors


async def test_runs_still_waiting_for_the_lock_are_dropped_when_the_proxy_goes(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    seen = sandbox.state.stats.token_requests
    async with helper_process() as helper:
        assert (await helper.hello(config))["ready"] is True
        async with FileStore.from_config(config).lock(10):
            await helper.ask(rejected(old))
            await asyncio.sleep(0.3)
            helper.vanish()
            # Gone while the lock is still ours: nothing was marked or sent to Pleo.
            assert await helper.exited_within(2.0) == 0
    state = await stored(config)
    assert (state.tokens, state.refresh_started_at) == (old, None)
    assert sandbox.state.stats.token_requests == seen


async def test_it_ignores_stop_signals_until_its_proxy_closes(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    async with helper_process() as helper:
        assert (await helper.hello(config))["ready"] is True
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            helper.process.send_signal(signum)
        await asyncio.sleep(0.3)
        assert helper.process.returncode is None
        await helper.ask(rejected(old), request_id=7)
        answer = await asyncio.wait_for(wire.receive(helper.reader), 20)
        assert answer is not None
        parsed = wire.parse_answer(answer)
        assert parsed.id == 7
        assert parsed.outcome().by_us
        helper.writer.close()
        assert await helper.exited_within(5.0) == 0


async def test_it_never_outlives_its_last_exchange_by_more_than_the_token_timeout(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, old = await seeded(sandbox, tmp_path)
    config = replace(config, timeouts=Timeouts(token_request=1.0, connect=1.0, shutdown=1.0))
    await set_knobs(sandbox.url, token_latency=30.0)  # Pleo never answers in time
    async with helper_process() as helper:
        assert (await helper.hello(config))["ready"] is True
        seen = sandbox.state.stats.token_requests
        await helper.ask(rejected(old), token_request=1.0)
        await until_token_request(sandbox, seen)
        helper.vanish()
        gone_at = time.monotonic()
        assert await helper.exited_within(1.0 + WRITE_GRACE) == 0
        assert time.monotonic() - gone_at < 1.0 + 1.0
    # The timed-out attempt is recorded and the mark cleared; the tokens are as they were.
    state = await stored(config)
    assert (state.tokens, state.refresh_started_at) == (old, None)
    assert state.last_refresh_outcome == "transient"


async def test_settings_of_another_protocol_are_refused_in_one_line(tmp_path: Path) -> None:
    async with helper_process() as helper:
        await helper.send({"protocol": 99})
        answer = await asyncio.wait_for(wire.receive(helper.reader), 20)
        assert answer is not None
        assert answer["ready"] is False
        assert "protocol" in answer["error"]
        assert await helper.exited_within(5.0) == 2
        assert "Traceback" not in await helper.stderr()


async def test_a_proxy_gone_before_the_settings_ends_it_quietly() -> None:
    async with helper_process() as helper:
        helper.vanish()
        assert await helper.exited_within(10.0) == 0
        assert await helper.stderr() == ""


@pytest.mark.parametrize("logged_out", [False, True], ids=["kept", "discarded"])
async def test_a_result_it_could_not_write_is_written_at_exit_unless_discarded(
    sandbox: RunningSandbox, tmp_path: Path, logged_out: bool
) -> None:
    """The disk was full when Pleo answered: the helper keeps the result (the only live
    tokens) and, once its proxy is gone, writes it over its own mark before exiting.
    After a logout (`discard`) it never does: a refresh result never outlives a logout."""
    config, old = await seeded(sandbox, tmp_path)
    await set_knobs(sandbox.url, token_latency=1.0)
    async with helper_process() as helper:
        assert (await helper.hello(config))["ready"] is True
        seen = sandbox.state.stats.token_requests
        await helper.ask(rejected(old))
        await until_token_request(sandbox, seen)  # the mark is written; Pleo answers in 1 s
        with file_size_limit(helper.process.pid, 64):
            frame = await asyncio.wait_for(wire.receive(helper.reader), 20)
            assert frame is not None
            answer = wire.parse_answer(frame)
            with pytest.raises(StoreError):
                answer.outcome()
            assert answer.pending is not None
            assert answer.pending.fresh
            if logged_out:
                await helper.send(wire.discard_doc("default"))
        helper.writer.close()
        assert await helper.exited_within(10.0) == 0
    state = await stored(config)
    if logged_out:
        assert (state.tokens, state.refresh_count) == (old, 0)  # only its mark is left
        assert state.refresh_started_at is not None
    else:
        assert state.tokens is not None
        assert state.tokens.access_token != old.access_token
        assert (state.refresh_count, state.refresh_started_at) == (1, None)
    stats = sandbox.state.stats
    assert (stats.refresh_grants, stats.reuse_detected) == (1, 0)
