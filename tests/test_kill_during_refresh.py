"""SIGKILL in the middle of a token exchange loses no grant (the refresh helper's purpose).

Real `pleo-proxy run` processes, the sandbox with its token endpoint slowed to 800 ms, and
traffic flowing. Each round waits until a refresh (proactive, or every other round one
that a 401 started) reaches the token endpoint, SIGKILLs the proxy's main process (in half
the rounds its whole process group) at a random moment of the exchange, and starts the
proxy again. The refresh helper finishes the exchange and persists it; after every
restart the proxy serves without re-authorisation, the helper has exited within the
token-request timeout, and the sandbox never sees a refresh token presented twice.
Killing the helper too (the whole cgroup at once) keeps the honest end: "a refresh was
interrupted", one refused attempt, no loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.lifecycle.exchanger import WRITE_GRACE
from proxy.lifecycle.manager import INTERRUPTED_REASON
from tests.flows import authorise_store, traffic
from tests.processes import PLEO_PROXY, children, free_port, write_config
from tests.redis_server import redis_url
from tests.sandboxes import RunningSandbox, sandbox, set_knobs

__all__ = ["redis_url", "sandbox"]

ROUNDS = int(os.environ.get("PLEO_PROXY_KILL_ROUNDS", "20"))
PID1_ROUNDS = 2
TOKEN_LATENCY = 0.8
# Tokens live 2 s and are refreshed 1 s before expiry: an exchange starts every second.
ACCESS_TTL = 2
TOKEN_REQUEST = 5.0  # write_config's timeouts.token_request
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(frozen=True)
class Rig:
    sandbox: RunningSandbox
    config: Path
    state_dir: Path
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "tokens.enc.lock"

    @property
    def token_requests(self) -> int:
        return self.sandbox.state.stats.token_requests

    def start(self, *, workers: int = 1, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """`pleo-proxy run` in its own process group (so that the group can be killed)."""
        args = [*prefix, *PLEO_PROXY, "run", "--config", str(self.config), "--log-format", "json"]
        if workers > 1:
            args += ["--workers", str(workers)]
        with self.log.open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)


async def rig(sandbox: RunningSandbox, tmp_path: Path, **tokens: Any) -> Rig:
    """An authorised proxy configuration; `tokens` overrides the store (e.g. Redis)."""
    port = free_port()
    state_dir = tmp_path / "state"
    config = write_config(
        tmp_path / "proxy.yaml",
        sandbox_url=sandbox.url,
        port=port,
        state_dir=state_dir,
        **({"tokens": tokens} if tokens else {}),
    )
    await set_knobs(sandbox.url, access_ttl=ACCESS_TTL)
    await authorise_store(sandbox.url, config, state_dir)
    await set_knobs(sandbox.url, token_latency=TOKEN_LATENCY)
    return Rig(sandbox, config, state_dir, port, tmp_path / "proxy.log")


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as response:
        return response.status, await response.json(content_type=None)


async def serves(rig: Rig) -> None:
    """Until a request through the proxy succeeds; never a re-authorisation meanwhile."""
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client, asyncio.timeout(30):
        while True:
            try:
                status, body = await get(client, f"{rig.base}/v1/introspect")
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
                continue
            if status == 200:
                return
            assert body.get("error") != "reauthorization_required", body
            await asyncio.sleep(0.05)


async def exchange_started(rig: Rig, seen: int) -> None:
    """Until the token endpoint has a request beyond the `seen` first ones."""
    async with asyncio.timeout(20):
        while rig.token_requests <= seen:
            await asyncio.sleep(0.005)


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def lock_holder(lock_file: Path) -> int | None:
    """The process holding `lock_file`'s flock, from /proc/locks (its refresh helper)."""
    st = os.stat(lock_file)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5] == device:  # waiters read "N: -> FLOCK ..."
            return int(fields[4])
    return None


@asynccontextmanager
async def flowing(rig: Rig) -> AsyncIterator[Counter[str]]:
    """Four clients sending requests through the proxy while the body runs."""
    results: Counter[str] = Counter()
    load = asyncio.create_task(traffic([rig.port], time.monotonic() + 60, results, workers=4))
    try:
        yield results
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Its exit code; past `timeout` its process group is killed and the test fails."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # never leave a proxy behind (`unshare` too)
        await asyncio.to_thread(proc.wait, 10)
        raise


async def kill_rounds(
    rig: Rig, *, rounds: int = ROUNDS, workers: int = 1, prefix: tuple[str, ...] = ()
) -> list[float]:
    """`rounds` kills inside exchanges, each followed by a restart; the kill offsets.

    With workers, or under a `prefix` that makes the proxy PID 1, the victim is the
    worker whose helper holds the store lock, and the supervisor ends the group itself.
    """
    rng = random.Random(os.environ.get("PLEO_PROXY_SEED", "exchange"))
    offsets: list[float] = []
    supervised = workers > 1 or bool(prefix)
    killed: list[tuple[int, float]] = []  # (helper, when its proxy was killed)
    for round_number in range(rounds):
        proc = rig.start(workers=workers, prefix=prefix)
        try:
            await serves(rig)
            await helpers_gone(killed)
            async with flowing(rig):
                seen = rig.token_requests
                if round_number % 2:
                    # A 401 for the next request: an on-demand refresh, at once. Even
                    # rounds wait for the proactive one (within a second, tokens live 2 s).
                    rig.sandbox.state.set_knobs({"api_401_once": True})
                await exchange_started(rig, seen)
                helper = lock_holder(rig.lock_file) if supervised else children(proc.pid)[0]
                assert helper is not None, "nobody holds the lock during the exchange"
                victim = parent(helper)  # the worker whose helper runs the exchange
                offsets.append(rng.uniform(0.0, TOKEN_LATENCY + 0.1))
                await asyncio.sleep(offsets[-1])
                if victim == proc.pid and round_number % 4 >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: not the helper
                else:
                    os.kill(victim, signal.SIGKILL)
                killed.append((helper, time.monotonic()))
        finally:
            failed = sys.exc_info()[0] is not None
            if proc.poll() is None and (failed or not supervised):
                os.killpg(proc.pid, signal.SIGKILL)
            await wait_exit(proc)  # supervised: the supervisor ends the group itself
        if supervised:  # it waited for the helper and reaped it: not even a zombie is left
            assert not Path(f"/proc/{helper}").exists()
    await helpers_gone(killed)
    return offsets


async def helpers_gone(killed: list[tuple[int, float]]) -> None:
    """Each helper exited within the token-request timeout of its proxy's death (usually
    at once: the exchange ends with the token endpoint's answer, 800 ms at most)."""
    for helper, killed_at in killed:
        while not gone(helper):
            deadline = killed_at + TOKEN_REQUEST + WRITE_GRACE
            assert time.monotonic() < deadline, f"the refresh helper {helper} outlived it"
            await asyncio.sleep(0.02)


async def the_proxy_serves_once_more(rig: Rig) -> None:
    proc = rig.start()
    try:
        await serves(rig)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0


def assert_no_grant_lost(rig: Rig, offsets: list[float]) -> None:
    """No refresh token came back twice, one consent, and every killed exchange finished."""
    stats = rig.sandbox.state.stats
    print(f"{len(offsets)} kills at {sorted(round(o, 2) for o in offsets)} s, {stats}")
    assert stats.reuse_detected == 0
    assert stats.code_grants == 1  # authorised once, never again
    # Every killed exchange was finished by its helper (and the restarts refreshed too).
    assert stats.refresh_grants >= len(offsets)
    assert sum(1 for g in rig.sandbox.state.grants_json() if not g["revoked"]) == 1


async def test_killing_the_proxy_in_exchanges_loses_no_grant(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    the_rig = await rig(sandbox, tmp_path)
    offsets = await kill_rounds(the_rig)
    await the_proxy_serves_once_more(the_rig)
    assert_no_grant_lost(the_rig, offsets)


async def test_killing_the_proxy_in_exchanges_loses_no_grant_with_redis(
    sandbox: RunningSandbox,
    tmp_path: Path,
    redis_url: str,
) -> None:
    the_rig = await rig(sandbox, tmp_path, store="redis", redis_url=redis_url)
    offsets = await kill_rounds(the_rig)
    await the_proxy_serves_once_more(the_rig)
    assert_no_grant_lost(the_rig, offsets)


async def test_killing_the_refreshing_worker_loses_no_grant(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    the_rig = await rig(sandbox, tmp_path)
    offsets = await kill_rounds(the_rig, workers=2)
    await the_proxy_serves_once_more(the_rig)
    assert_no_grant_lost(the_rig, offsets)


async def test_as_pid_1_a_killed_workers_exchange_finishes_before_the_end(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """A container's entrypoint is PID 1 of its own PID namespace, and when PID 1 ends the
    kernel kills all in it. `pleo-proxy run` as PID 1 (here under `unshare`) supervises
    its one worker and outlives the helper of a killed one."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    the_rig = await rig(sandbox, tmp_path)
    prefix = (unshare, "--pid", "--fork", "--mount-proc")
    offsets = await kill_rounds(the_rig, rounds=PID1_ROUNDS, prefix=prefix)
    await the_proxy_serves_once_more(the_rig)
    assert_no_grant_lost(the_rig, offsets)


async def test_killing_proxy_and_helper_at_once_ends_as_an_interrupted_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """The whole cgroup at once, in the exchange: Pleo's answer has nowhere to go."""
    the_rig = await rig(sandbox, tmp_path)
    proc = the_rig.start()
    try:
        await serves(the_rig)
        async with flowing(the_rig):
            await exchange_started(the_rig, the_rig.token_requests)
            (helper,) = children(proc.pid)
            await asyncio.sleep(TOKEN_LATENCY / 2)  # the sandbox rotates when its pause ends
            for pid in (helper, proc.pid):
                os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        await wait_exit(proc)
    proc = the_rig.start()
    try:
        await ends_interrupted(the_rig)
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc)
    stats = sandbox.state.stats
    assert stats.reuse_detected == 1  # the one refused attempt with the spent token


async def ends_interrupted(rig: Rig) -> None:
    """`reauthorization_required` because "a refresh was interrupted", and no loop."""
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client, asyncio.timeout(30):
        while True:
            try:
                status, body = await get(client, f"{rig.base}/v1/introspect")
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
                continue
            assert status != 200, "served with tokens that should have been lost"
            _, state = await get(client, f"{rig.base}/_proxy/status")
            if state.get("reason") == INTERRUPTED_REASON:
                break
            await asyncio.sleep(0.05)
        assert state["state"] == "reauthorization_required", json.dumps(state)
        calls = rig.token_requests
        for _ in range(5):
            status, body = await get(client, f"{rig.base}/v1/introspect")
            assert (status, body["error"]) == (503, "reauthorization_required")
        await asyncio.sleep(1.2)  # the idle re-read would have retried by now
        assert rig.token_requests == calls


pytestmark = pytest.mark.timeout(240)
