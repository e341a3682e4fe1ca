"""live_timeout: a deadline in time the process ran. A real child process is stopped with
SIGSTOP while its request is answered, then resumed: it reads the answer, where aiohttp's
own timeout (the control) gives up on it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.lifecycle.livetime import live_timeout

REPO = Path(__file__).resolve().parents[2]
ANSWER_AFTER = 1.0
STOPPED_FOR = 4.0
CHILD = """
import asyncio, sys, aiohttp
from proxy.lifecycle.livetime import live_timeout

async def main(url, mode):
    async with aiohttp.ClientSession() as session:
        try:
            if mode == "live":
                async with live_timeout(3.0), session.post(url) as r:
                    print("answer", await r.text(), flush=True)
            else:
                timeout = aiohttp.ClientTimeout(total=3.0)
                async with session.post(url, timeout=timeout) as r:
                    print("answer", await r.text(), flush=True)
        except TimeoutError:
            print("timeout", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_slow_operation_times_out_in_about_its_time() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with live_timeout(0.6):
            await asyncio.sleep(10)
    assert 0.6 <= time.monotonic() - started < 1.5


async def test_a_quick_operation_leaves_nothing_running() -> None:
    before = asyncio.all_tasks()
    async with live_timeout(5.0):
        await asyncio.sleep(0.01)
    assert asyncio.all_tasks() == before


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(ANSWER_AFTER)
        return web.Response(text="rotated-tokens")

    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def _stopped_while_answered(url: str, mode: str) -> bytes:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, mode, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.sleep(0.5)  # the request is on its way; the answer comes at 1 s
        child.send_signal(signal.SIGSTOP)
        await asyncio.sleep(STOPPED_FOR)  # longer than the 3 s timeout
        child.send_signal(signal.SIGCONT)
        assert child.stdout is not None
        return await asyncio.wait_for(child.stdout.readline(), 10.0)
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGCONT)
        await asyncio.wait_for(child.wait(), 10.0)


async def test_a_process_stopped_while_answered_reads_the_answer(slow_server: str) -> None:
    assert await _stopped_while_answered(slow_server, "live") == b"answer rotated-tokens\n"


async def test_control_aiohttp_timeout_gives_up_on_the_answer(slow_server: str) -> None:
    assert await _stopped_while_answered(slow_server, "aiohttp") == b"timeout\n"
