"""Redis dies in the middle of a refresh: the new tokens are not lost.

A real `pleo-proxy run` on `tokens.store: redis`; the sandbox's latency knob puts the
Redis crash between the in-progress mark and the final write. Redis comes back empty
(no persistence), and the proxy writes the tokens it kept in memory before it sends
anything more to Pleo.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.store.crypto import generate_key
from tests.flows import authorise_store
from tests.processes import free_port, http_get, start_proxy, stop, wait_for, write_config
from tests.redis_server import ping
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen(
        [*command, "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not ping(port):
        assert process.poll() is None, "redis-server exited"
        assert time.monotonic() < deadline, "redis-server did not answer PING"
        time.sleep(0.02)
    return process


async def get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body


async def test_redis_crash_during_a_refresh_loses_no_token(
    sandbox: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLEO_PROXY_KEY", base64.b64encode(generate_key()).decode())
    redis_port, port = free_port(), free_port()
    redis = start_redis(redis_port, tmp_path)
    config_file = write_config(
        tmp_path / "c.yaml",
        sandbox_url=sandbox.url,
        port=port,
        state_dir=tmp_path / "state",
        tokens={"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
    )
    await authorise_store(sandbox.url, config_file, tmp_path / "state")
    proxy = start_proxy(config_file)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_for, f"{base}/_proxy/readyz")
        before = await get_stats(sandbox.url)
        # The API's 401 comes at t=2 s (the mark is written), the token endpoint's answer
        # at t=4 s (the final write): Redis dies in between.
        await set_knobs(sandbox.url, api_401_once=True, latency=2.0)
        request = asyncio.create_task(get(f"{base}/v1/introspect"))
        await asyncio.sleep(3.0)
        redis.send_signal(signal.SIGKILL)
        redis.wait(timeout=10)
        status, body = await request
        assert (status, body.get("error")) == (503, "store_error")
        assert (await get_stats(sandbox.url))["refresh_grants"] == before["refresh_grants"] + 1
        await set_knobs(sandbox.url, latency=0)

        redis = await asyncio.to_thread(start_redis, redis_port, tmp_path)  # empty
        deadline = time.monotonic() + 15
        while (await get(f"{base}/v1/introspect"))[0] != 200:
            assert time.monotonic() < deadline, "the proxy did not recover"
            await asyncio.sleep(0.2)
        stats = await get_stats(sandbox.url)
        assert stats["refresh_grants"] == before["refresh_grants"] + 1
        assert stats["reuse_detected"] == 0
        _, raw = await asyncio.to_thread(http_get, f"{base}/_proxy/status")
        assert json.loads(raw)["state"] == "authorised"
    finally:
        stop(proxy)
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=10)
