"""`pleo-proxy run --workers 2`: two processes on one port, one token store, real traffic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import aiohttp

from proxy.ops.workers import PARENT_ONLY_VARIABLES, READY_FD_VARIABLE
from tests.flows import grant_tokens, sandbox_config
from tests.processes import (
    PLEO_PROXY,
    free_port,
    import_tokens,
    sandbox_process,
    wait_for,
    write_config,
)
from tests.sandboxes import get_stats, set_knobs

REQUESTS = 10_000
ACCESS_TTL = 3
# refresh margin = min(before_expiry, lifetime / 2): a token is replaced this long after issue.
REFRESH_EVERY = ACCESS_TTL - ACCESS_TTL / 2
MIN_SECONDS = 4 * ACCESS_TTL


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _start_workers(config: Path, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config), "--workers", str(count)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _traffic(url: str, until_count: int, until_time: float) -> Counter[str]:
    results: Counter[str] = Counter()

    async def client() -> None:
        # A fresh connection now and then, so the kernel spreads them over both workers.
        while sum(results.values()) < until_count or time.monotonic() < until_time:
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    try:
                        async with session.get(f"{url}/v1/introspect") as resp:
                            await resp.read()
                            results[str(resp.status)] += 1
                    except aiohttp.ClientError as exc:
                        results[type(exc).__name__] += 1

    await asyncio.gather(*(client() for _ in range(16)))
    return results


async def test_two_workers_share_the_port_and_refresh_once_per_rotation(tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    with sandbox_process() as sandbox_url:
        config = write_config(
            tmp_path / "proxy.yaml", sandbox_url=sandbox_url, port=port, state_dir=state_dir
        )
        await set_knobs(sandbox_url, access_ttl=ACCESS_TTL)
        tokens = await grant_tokens(sandbox_config(sandbox_url, state_dir), now=time.time())
        await asyncio.to_thread(import_tokens, config, tokens)
        supervisor = _start_workers(config, 2)
        try:
            url = f"http://127.0.0.1:{port}"
            await asyncio.to_thread(wait_for, f"{url}/_proxy/readyz")
            # Workers start one after the other: the first may answer before the second runs.
            deadline = time.monotonic() + 20
            while len(_children(supervisor.pid)) < 2:
                assert time.monotonic() < deadline, "the second worker never started"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            results = await _traffic(url, REQUESTS, started + MIN_SECONDS)
            elapsed = time.monotonic() - started
            stats = await get_stats(sandbox_url)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(supervisor.wait, 30)
    print(f"elapsed {elapsed:.1f} s, {results}, {stats}")  # shown with -s or on failure
    assert code == 0
    assert set(results) == {"200"}, results
    assert results["200"] >= REQUESTS
    assert stats["reuse_detected"] == 0
    # The token expired several times during the run, and each rotation was refreshed
    # by one worker only: two workers refreshing each rotation would make about twice
    # elapsed / REFRESH_EVERY grants (the import's token adds at most one more).
    assert stats["refresh_grants"] >= elapsed / ACCESS_TTL - 1
    assert stats["refresh_grants"] <= elapsed / REFRESH_EVERY + 2


def test_supervisor_reports_a_failed_worker_once_and_exits_1(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "tokens.enc").write_bytes(b"not a token file")
    config = write_config(
        tmp_path / "proxy.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=free_port(),
        state_dir=state_dir,
    )
    done = subprocess.run(
        [*PLEO_PROXY, "run", "--config", str(config), "--workers", "3"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr.decode()


def test_service_manager_variables_stay_with_the_supervisor() -> None:
    assert "NOTIFY_SOCKET" in PARENT_ONLY_VARIABLES
    assert "LISTEN_FDS" in PARENT_ONLY_VARIABLES
    assert READY_FD_VARIABLE not in os.environ
