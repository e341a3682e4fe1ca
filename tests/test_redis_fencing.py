"""Sidecars on one Redis when one of them misbehaves: real `pleo-proxy run` processes, a real
redis-server, the sandbox counting refresh grants and every reuse of a spent refresh token.

- the lock holder (an instance's refresh helper, which holds the lock and calls Pleo for
  it) is frozen (SIGSTOP) while Pleo works on its refresh, past its lease, and resumed: it
  overwrites nothing newer, no token is presented twice, nobody's request fails;
- one instance's writes fail (a Redis ACL takes its write permission away) after Pleo
  rotated: the others never present the spent refresh token, and all recover when it can
  write again;
- Redis is restarted under traffic (AOF, password, db 5): no request fails, refreshes go on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.store.crypto import generate_key
from proxy.store.redis import RedisStore, key_prefix
from proxy.store.redisclient import LOCK_MARGIN
from proxy.tokenset import StoredState
from tests.flows import authorise_store, grant_tokens, sandbox_config
from tests.processes import (
    children,
    free_port,
    import_tokens,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.redis_server import RedisServer, running_redis
from tests.sandboxes import get_stats, set_knobs

TOKEN_REQUEST = 3.0  # timeouts.token_request: the lock's TTL is this + LOCK_MARGIN
LEASE = TOKEN_REQUEST + LOCK_MARGIN
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=90)


@dataclass
class Instance:
    config: Path
    port: int
    process: Any = None  # subprocess.Popen[bytes] once started

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Shared:
    """One Redis, one sandbox, one key; what the test reads from the store."""

    redis_url: str
    sandbox_url: str
    key: bytes
    tmp_path: Path

    @property
    def prefix(self) -> str:
        return key_prefix("sandbox-client", self.sandbox_url)

    async def stored(self) -> StoredState | None:
        store = RedisStore(
            self.redis_url, prefix=self.prefix, key_file=self.tmp_path / "unused", key=self.key
        )
        try:
            return await store.load()
        finally:
            await store.close()

    def instance(self, index: int, redis_url: str | None = None) -> Instance:
        port = free_port()
        config = write_config(
            self.tmp_path / f"proxy{index}.yaml",
            sandbox_url=self.sandbox_url,
            port=port,
            state_dir=self.tmp_path / f"state{index}",
            tokens={"store": "redis", "redis_url": redis_url or self.redis_url},
            timeouts={"token_request": TOKEN_REQUEST},
        )
        return Instance(config, port)


@asynccontextmanager
async def shared_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> AsyncIterator[Shared]:
    key = generate_key()
    # One key for every instance, from the environment (what the children inherit).
    monkeypatch.setenv("PLEO_PROXY_KEY", base64.b64encode(key).decode())
    with sandbox_process() as sandbox_url:
        yield Shared(redis_url, sandbox_url, key, tmp_path)


@asynccontextmanager
async def running(*instances: Instance) -> AsyncIterator[None]:
    for instance in instances:
        instance.process = start_proxy(instance.config)
    try:
        for instance in instances:
            await asyncio.to_thread(wait_for, f"{instance.base}/_proxy/healthz")
        yield
    finally:
        for instance in instances:
            with suppress(ProcessLookupError):
                instance.process.send_signal(signal.SIGCONT)  # a stopped one ignores TERM
            stop(instance.process)


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client, client.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body


class Traffic:
    """`workers` clients GET /v1/introspect through `instances` until stopped."""

    def __init__(self, instances: list[Instance], workers: int) -> None:
        self.results: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._worker(instances[i % len(instances)])) for i in range(workers)
        ]

    async def _worker(self, instance: Instance) -> None:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            while not self._stop.is_set():
                try:
                    async with session.get(f"{instance.base}/v1/introspect") as resp:
                        body = await resp.read()
                        key = str(resp.status)
                        if resp.status != 200:
                            key += f" {json.loads(body).get('error')}"
                        self.results[key] += 1
                except aiohttp.ClientError as exc:
                    self.results[type(exc).__name__] += 1

    def failed(self) -> int:
        return sum(n for outcome, n in self.results.items() if outcome != "200")

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 120)
        return self.results


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.02)


async def lock_holder(raw: aioredis.Redis, shared: Shared) -> int | None:
    """The pid in the lock's value (`host:pid:random`), if the lock is held."""
    value = await raw.get(f"{shared.prefix}lock")
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    return int(text.rsplit(":", 2)[1])


async def refresh_outcomes(instance: Instance, outcome: str) -> float:
    """The instance's `pleo_proxy_token_refreshes_total{outcome=...}`."""
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
        client.get(f"{instance.base}/_proxy/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f'pleo_proxy_token_refreshes_total{{outcome="{outcome}"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no refresh counter for {outcome}")


async def start_refresh_on(
    instance: Instance, shared: Shared, raw: aioredis.Redis
) -> tuple[asyncio.Task[tuple[int, dict[str, Any]]], float]:
    """A request through `instance` that Pleo answers 401 once: it refreshes. Returns the
    request and when the refresh was seen marked in the store by `instance`'s lock."""
    await set_knobs(shared.sandbox_url, api_401_once=True)
    request = asyncio.create_task(get(f"{instance.base}/v1/introspect"))

    async def marked_by_it() -> bool:
        # The lock is its refresh helper's (its child), which runs the exchange for it.
        if await lock_holder(raw, shared) not in children(instance.process.pid):
            return False
        state = await shared.stored()
        return state is not None and state.refresh_started_at is not None

    await until(marked_by_it, 15, "the instance marked a refresh under its lock")
    return request, time.monotonic()


# -- frozen past its lease ------------------------------------------------------------

# Pleo answers the frozen holder this long after its request; it is resumed a second
# before, once its lease has lapsed. Its live waiting time stays under TOKEN_REQUEST.
PLEO_ANSWERS_AFTER = LEASE + 5.0
RESUME_BEFORE_ANSWER = 1.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("meanwhile", ["nothing", "new_consent"])
async def test_a_holder_frozen_past_its_lease_during_a_refresh_overwrites_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    with running_redis() as server:
        async with shared_world(tmp_path, monkeypatch, server.url) as shared:
            await _frozen_holder(shared, meanwhile)


async def _frozen_holder(shared: Shared, meanwhile: str) -> None:
    holder, other = shared.instance(0), shared.instance(1)
    await authorise_store(shared.sandbox_url, holder.config, shared.tmp_path / "state0")
    raw = aioredis.Redis.from_url(shared.redis_url)
    async with running(holder, other):
        before = await get_stats(shared.sandbox_url)
        await set_knobs(shared.sandbox_url, token_latency=PLEO_ANSWERS_AFTER)
        request, marked_at = await start_refresh_on(holder, shared, raw)
        frozen = await lock_holder(raw, shared)  # its refresh helper, its request with Pleo
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        await set_knobs(shared.sandbox_url, token_latency=0)
        traffic = Traffic([other], workers=8)
        try:
            # Past its lease: the lock expires by itself (nobody else needed it).
            await until(lambda: _absent(raw, f"{shared.prefix}lock"), LEASE + 5, "the lease lapsed")
            consent = None
            if meanwhile == "new_consent":  # newer tokens, written while it is frozen
                config = sandbox_config(shared.sandbox_url, shared.tmp_path / "grant")
                consent = await grant_tokens(config, now=time.time())
                await asyncio.to_thread(import_tokens, other.config, consent)
            resume_at = marked_at + PLEO_ANSWERS_AFTER - RESUME_BEFORE_ANSWER
            assert time.monotonic() < resume_at, "too slow to resume it before Pleo answers"
            await asyncio.sleep(resume_at - time.monotonic())
            os.kill(frozen, signal.SIGCONT)
            status, body = await asyncio.wait_for(request, 60)
            await until(
                lambda: _settled(shared), 20, "the store holds new tokens and no refresh mark"
            )
            await asyncio.sleep(2.0)  # both keep serving the new tokens
        finally:
            with suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)  # a stopped helper would never exit
            results = await traffic.stop()
        lock_lost = await refresh_outcomes(holder, "lock_lost")
        for instance in (holder, other):
            assert (await get(f"{instance.base}/v1/introspect"))[0] == 200
    await raw.aclose()
    stats = await get_stats(shared.sandbox_url)
    final = await shared.stored()
    # Nobody's request failed: not the one that waited for the frozen holder, nor the
    # other instance's, which kept serving throughout.
    assert (status, body.get("error")) == (200, None), body
    assert set(results) == {"200"}, results
    assert results["200"] > 50
    assert stats["reuse_detected"] == 0
    assert stats["refresh_grants"] == before["refresh_grants"] + 1  # its one refresh
    # Its lease had lapsed: its write of the refreshed tokens was refused at first.
    assert lock_lost >= 1
    assert final is not None
    assert final.tokens is not None
    if consent is not None:
        # The newer tokens stayed; its refreshed ones (of the old grant) were dropped.
        assert final.tokens.access_token == consent.access_token
        assert final.refresh_count == 0
    else:
        assert final.refresh_count == 1


async def _absent(raw: aioredis.Redis, key: str) -> bool:
    return not await raw.exists(key)


async def _settled(shared: Shared) -> bool:
    state = await shared.stored()
    return state is not None and state.refresh_started_at is None and state.tokens is not None


# -- one instance's writes fail ---------------------------------------------------------


@pytest.mark.timeout(120)
async def test_an_instance_whose_write_fails_leaves_no_spent_token_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_redis() as server:
        admin = aioredis.Redis.from_url(server.url)
        # A Redis user per instance (a password each, db 3): the ACL takes one's writes away.
        for user, password in (("holder", "holder-pass"), ("other", "other-pass")):
            await acl_setuser(admin, user, "on", f">{password}", "~*", "&*")
            await acl_setuser(admin, user, "+@all")
        base = f"127.0.0.1:{server.port}/3"
        async with shared_world(tmp_path, monkeypatch, f"redis://{base}") as shared:
            holder = shared.instance(0, f"redis://holder:holder-pass@{base}")
            other = shared.instance(1, f"redis://other:other-pass@{base}")
            try:
                await _write_fails(shared, admin, holder, other)
            finally:
                await admin.aclose()


async def _write_fails(
    shared: Shared, admin: aioredis.Redis, holder: Instance, other: Instance
) -> None:
    await authorise_store(shared.sandbox_url, holder.config, shared.tmp_path / "state0")
    raw = aioredis.Redis.from_url(shared.redis_url)
    async with running(holder, other):
        before = await get_stats(shared.sandbox_url)
        await set_knobs(shared.sandbox_url, token_latency=2.0)
        request, _ = await start_refresh_on(holder, shared, raw)
        # While Pleo rotates: the holder may still read, and write its lock, nothing else.
        lock = f"{shared.prefix}lock"
        await acl_setuser(admin, "holder", "resetkeys", "%R~*", f"~{lock}")
        status, body = await asyncio.wait_for(request, 30)
        await set_knobs(shared.sandbox_url, token_latency=0)
        rotated = await get_stats(shared.sandbox_url)
        left = await shared.stored()
        # The others find its mark and the spent refresh token, and wait instead.
        traffic = Traffic([other], workers=4)
        try:
            await asyncio.sleep(6.0)
            waited = await get_stats(shared.sandbox_url)
            await acl_setuser(admin, "holder", "resetkeys", "~*")
            # The holder writes the tokens it kept as soon as it can; everyone takes them.
            await until(lambda: _serves(holder), 30, "the holder serves again")
            await until(lambda: _serves(other), 30, "the other instance serves again")
        finally:
            results = await traffic.stop()
    await raw.aclose()
    final = await shared.stored()
    stats = await get_stats(shared.sandbox_url)
    assert (status, body.get("error")) == (503, "store_error")  # "persisted before used"
    assert rotated["refresh_grants"] == before["refresh_grants"] + 1
    assert left is not None
    assert left.refresh_started_at is not None  # the mark and the spent token were left
    # While it could not write, nobody else presented the spent token: no second use.
    assert waited["token_requests"] == rotated["token_requests"]
    assert waited["reuse_detected"] == 0
    assert results["503 token_endpoint_unavailable"] > 0, results  # they did try
    assert set(results) <= {"200", "503 token_endpoint_unavailable"}, results
    # Recovered with the tokens it had kept: one refresh in all, never a reuse.
    assert stats["reuse_detected"] == 0
    assert stats["refresh_grants"] == before["refresh_grants"] + 1
    assert final is not None
    assert (final.refresh_count, final.refresh_started_at, final.reauth_reason) == (1, None, None)


async def acl_setuser(admin: aioredis.Redis, user: str, *rules: str) -> None:
    await admin.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]


async def _serves(instance: Instance) -> bool:
    return (await get(f"{instance.base}/v1/introspect"))[0] == 200


# -- Redis restarted under traffic ------------------------------------------------------

RESTART_TTL = 8.0  # access tokens: refreshed 4 s before expiry, so about every 4 s
DOWN_FOR = 2.0


@pytest.mark.timeout(120)
async def test_redis_restarted_under_traffic_fails_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    persist = ("--appendonly", "yes", "--appendfsync", "always")
    with running_redis(*persist, "--requirepass", "redis-pass", password="redis-pass") as server:
        url = f"redis://:redis-pass@127.0.0.1:{server.port}/5"  # a password and a db
        async with shared_world(tmp_path, monkeypatch, url) as shared:
            await _restart_under_traffic(shared, server)


async def _restart_under_traffic(shared: Shared, server: RedisServer) -> None:
    instances = [shared.instance(0), shared.instance(1)]
    await set_knobs(shared.sandbox_url, access_ttl=RESTART_TTL)
    await authorise_store(shared.sandbox_url, instances[0].config, shared.tmp_path / "state0")
    async with running(*instances):
        traffic = Traffic(instances, workers=16)
        try:
            await asyncio.sleep(RESTART_TTL)  # a refresh or two, shared
            # Just after a refresh, so that the outage is inside the access token's life.
            grants = (await get_stats(shared.sandbox_url))["refresh_grants"]
            await until(lambda: _refreshed_since(shared, grants), 15, "a refresh")
            await asyncio.sleep(0.3)  # both instances have the new tokens
            at_restart = (await get_stats(shared.sandbox_url))["refresh_grants"]
            old = server.process
            await asyncio.to_thread(server.restart, down_for=DOWN_FOR)
            during = traffic.failed()
            await asyncio.sleep(3 * RESTART_TTL)  # refreshes go on through the new server
        finally:
            results = await traffic.stop()
    stats = await get_stats(shared.sandbox_url)
    final = await shared.stored()
    assert old.returncode is not None  # it was down
    assert during == 0
    assert set(results) == {"200"}, results
    assert stats["reuse_detected"] == 0
    assert stats["refresh_grants"] >= at_restart + 3  # full recovery: refreshing again
    assert final is not None
    # The state survived the restart (AOF): the count went on from where it was.
    assert final.refresh_count == stats["refresh_grants"]


async def _refreshed_since(shared: Shared, grants: int) -> bool:
    return int((await get_stats(shared.sandbox_url))["refresh_grants"]) > grants
