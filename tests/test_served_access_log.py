"""The access line of the real `run` command, which serves on uvloop when installed.

uvloop's `loop.time()` ticks in whole milliseconds, so a duration taken from it (as
aiohttp's own is) read 0.0 or 1.0 ms for most small requests, less than the upstream
time on the same line. The `speed` extra is part of the test install: without uvloop
this test would not test what it is for, so it fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.processes import free_port, stop
from tests.upstreams import Seen, run_echo_upstream

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 40


async def _slow_echo(request: web.Request, seen: Seen) -> web.Response:
    await asyncio.sleep(0.0015)
    return web.json_response({"ok": True})


async def test_durations_are_finer_than_milliseconds_and_cover_the_upstream_time(
    tmp_path: Path,
) -> None:
    assert importlib.util.find_spec("uvloop") is not None, "install the speed extra"
    port = free_port()
    async with run_echo_upstream() as upstream:
        upstream.respond = _slow_echo
        config = tmp_path / "c.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"host": "127.0.0.1", "port": port},
                    "pleo": {"api_url": upstream.url, "api_key": "test-api-key"},
                    "tokens": {"path": str(tmp_path / "t.enc"), "key_file": str(tmp_path / "k")},
                    "timeouts": {"shutdown": 2},
                }
            )
        )
        log = tmp_path / "proxy.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=out,
            )
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_ready(session, port)
                for _ in range(REQUESTS):
                    async with session.get(f"http://127.0.0.1:{port}/v1/x") as response:
                        assert response.status == 200
        finally:
            stop(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    forwarded = [d for d in lines if d.get("logger") == "proxy.access" and d["path"] == "/v1/x"]
    assert len(forwarded) == REQUESTS
    assert all(d["duration_ms"] >= d["upstream_ms"] >= 1.5 for d in forwarded)
    assert any(d["duration_ms"] != int(d["duration_ms"]) for d in forwarded)


async def _wait_ready(session: aiohttp.ClientSession, port: int) -> None:
    for _ in range(200):
        try:
            async with session.get(f"http://127.0.0.1:{port}/_proxy/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("the proxy did not start")
