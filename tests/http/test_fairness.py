"""proxy/http/fairness.py: per-connection concurrency and rate limits.

The rules on a fake clock first (no sleeps), then against real servers: a refused
request is a 429 with the proxy's own Retry-After and never reaches the upstream (its
hit count says so), one connection's limit touches no other, and Pleo's own 429s pass
through unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Limits, PerConnection
from proxy.errors import RateLimited
from proxy.http.fairness import Fairness
from tests.connections import connections_config, distinct_companies, give_tokens, serving, url_of
from tests.proxyproc import (
    RecordingCredentials,
    metric_value,
    proxy_config,
    raw_http,
    run_proxy_app,
)
from tests.sandboxes import RunningSandbox, sandbox
from tests.upstreams import EchoUpstream, Seen, upstream

__all__ = ["sandbox", "upstream"]  # fixtures, used by name


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(fairness: Fairness, name: str) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        fairness.admit(name)
    return info.value


# --- the rules, on a fake clock ---


def test_a_burst_is_admitted_then_the_rate_applies() -> None:
    clock = FakeClock()
    fairness = Fairness(PerConnection(rate=2, burst=3), clock=clock)
    for _ in range(3):
        fairness.admit("acme")
        fairness.release("acme")
    refused = refusal(fairness, "acme")
    assert (refused.status, refused.code, refused.reason) == (429, "rate_limited", "rate")
    assert refused.headers() == {"Retry-After": "1"}  # 0.5 s to the next token, rounded up
    clock.now += 0.5
    fairness.admit("acme")  # one token back after 1/rate seconds
    fairness.release("acme")
    refusal(fairness, "acme")


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    clock = FakeClock()
    fairness = Fairness(PerConnection(rate=0.3), clock=clock)  # bucket of 1
    fairness.admit("acme")
    assert refusal(fairness, "acme").retry_after == 4  # 1 / 0.3 = 3.33 s
    clock.now += 3.0
    assert refusal(fairness, "acme").retry_after == 1  # 0.1 token short: 0.33 s
    fast = Fairness(PerConnection(rate=1000, burst=1), clock=clock)
    fast.admit("acme")
    assert refusal(fast, "acme").retry_after == 1  # 1 ms, but never "0"


def test_the_bucket_never_fills_past_its_size() -> None:
    clock = FakeClock()
    fairness = Fairness(PerConnection(rate=1, burst=2), clock=clock)
    clock.now += 3600
    fairness.admit("acme")
    fairness.admit("acme")
    refusal(fairness, "acme")


def test_concurrency_refuses_the_next_until_a_slot_frees() -> None:
    fairness = Fairness(PerConnection(concurrency=2), clock=FakeClock())
    fairness.admit("acme")
    fairness.admit("acme")
    refused = refusal(fairness, "acme")
    assert (refused.reason, refused.retry_after) == ("concurrency", 1)
    fairness.release("acme")
    fairness.admit("acme")


def test_a_request_refused_for_concurrency_spends_no_rate_token() -> None:
    fairness = Fairness(PerConnection(concurrency=1, rate=1, burst=2), clock=FakeClock())
    fairness.admit("acme")
    for _ in range(5):
        assert refusal(fairness, "acme").reason == "concurrency"
    fairness.release("acme")
    fairness.admit("acme")  # the second token is still there


def test_connections_do_not_share_limits() -> None:
    fairness = Fairness(PerConnection(concurrency=1, rate=1), clock=FakeClock())
    fairness.admit("acme")
    refusal(fairness, "acme")
    fairness.admit("globex")
    refusal(fairness, "globex")


def test_slot_releases_when_the_block_fails() -> None:
    fairness = Fairness(PerConnection(concurrency=1), clock=FakeClock())
    with pytest.raises(RuntimeError), fairness.slot("acme"):
        raise RuntimeError("the forwarder failed")
    with fairness.slot("acme"):
        refusal(fairness, "acme")
    assert len(fairness) == 0  # concurrency only: an entry goes as its last request ends


def test_unlimited_keeps_no_state() -> None:
    fairness = Fairness(PerConnection(), clock=FakeClock())
    for index in range(1000):
        with fairness.slot(f"c{index}"):
            pass
    assert len(fairness) == 0


def test_the_table_is_bounded_by_dropping_idle_entries() -> None:
    clock = FakeClock()
    counted: list[str] = []
    fairness = Fairness(
        PerConnection(rate=10, burst=1), clock=clock, max_entries=50, on_refusal=counted.append
    )
    for index in range(5000):
        fairness.admit(f"c{index}")
        fairness.release(f"c{index}")
        clock.now += 0.01  # buckets refill 0.1 s after their request: idle again
    assert len(fairness) <= 51
    assert counted == []


def test_busy_entries_are_never_dropped() -> None:
    clock = FakeClock()
    fairness = Fairness(PerConnection(concurrency=1, rate=1000), clock=clock, max_entries=4)
    for index in range(8):
        fairness.admit(f"busy{index}")  # held: never released
    for index in range(200):
        fairness.admit(f"c{index}")
        fairness.release(f"c{index}")
        clock.now += 1
    for index in range(8):
        assert refusal(fairness, f"busy{index}").reason == "concurrency"


def test_refusals_are_reported_by_reason_only() -> None:
    counted: list[str] = []
    fairness = Fairness(
        PerConnection(concurrency=1, rate=1), clock=FakeClock(), on_refusal=counted.append
    )
    fairness.admit("acme")
    refusal(fairness, "acme")
    fairness.release("acme")
    refusal(fairness, "acme")
    assert counted == ["concurrency", "rate"]


# --- against real servers ---


def limited(
    *, concurrency: int | None = None, rate: float | None = None, burst: int | None = None
) -> Limits:
    per_connection = PerConnection(concurrency=concurrency, rate=rate, burst=burst)
    return replace(Limits(), per_connection=per_connection)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def proxy_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_over_the_rate_is_429_with_retry_after_and_nothing_forwarded(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    config = proxy_config(upstream.url, limits=limited(rate=0.5, burst=2))
    async with run_proxy_app(config, RecordingCredentials()) as proxy:
        base = proxy_url(proxy)
        for _ in range(2):
            async with client.get(f"{base}/v1/expenses") as response:
                assert response.status == 200
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 429
            assert response.headers["Content-Type"].startswith("application/json")
            assert 1 <= int(response.headers["Retry-After"]) <= 2  # 2 s per token at 0.5/s
            body = await response.json()
        assert body["error"] == "rate_limited"
        assert "retry after" in body["detail"]
        assert upstream.hits == 2
        assert await metric_value(client, base, 'pleo_proxy_rate_limited_total{reason="rate"}') == 1
        assert (
            await metric_value(client, base, 'pleo_proxy_rate_limited_total{reason="concurrency"}')
            == 0
        )


async def test_the_concurrency_limit_refuses_the_next_concurrent_request(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"path": seen.raw_path})

    upstream.respond = slow
    limit = 3
    config = proxy_config(upstream.url, limits=limited(concurrency=limit))
    async with run_proxy_app(config, RecordingCredentials()) as proxy:
        base = proxy_url(proxy)

        async def get(path: str) -> int:
            async with client.get(f"{base}{path}") as response:
                await response.read()
                return response.status

        held = [asyncio.create_task(get(f"/v1/slow/{i}")) for i in range(limit)]
        async with asyncio.timeout(10):
            while upstream.hits < limit:
                await asyncio.sleep(0.01)
        async with client.get(f"{base}/v1/one-too-many") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"] == "rate_limited"
        assert upstream.hits == limit  # the refused one never reached the upstream
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*held), 10) == [200] * limit
        assert await get("/v1/after") == 200  # the slots were given back
        assert [s.raw_path for s in upstream.seen][-1] == "/v1/after"
        sample = 'pleo_proxy_rate_limited_total{reason="concurrency"}'
        assert await metric_value(client, base, sample) == 1


async def test_a_refused_request_is_refused_before_its_body_is_sent(
    upstream: EchoUpstream,
) -> None:
    config = proxy_config(upstream.url, limits=limited(rate=0.01, burst=1))
    async with run_proxy_app(config, RecordingCredentials()) as proxy:
        assert proxy.port is not None
        head = (
            "POST /v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        plain = head.replace("Expect: 100-continue\r\n", "")
        first = await raw_http(proxy.port, (plain + "hello").encode())
        assert first.status == 200
        # Only the head: the proxy must answer without asking for the body.
        second = await raw_http(proxy.port, head.encode())
        assert second.status == 429
        assert b"100 Continue" not in second.head
        assert second.json()["error"] == "rate_limited"
        assert upstream.hits == 1


async def test_pleos_own_429_passes_through_unchanged(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def pleo_limited(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.Response(
            status=429,
            body=b'{"message": "slow down"}',
            headers={
                "Retry-After": "17",
                "X-RateLimit-Remaining": "0",
                "Content-Type": "application/problem+json",
            },
        )

    upstream.respond = pleo_limited
    config = proxy_config(upstream.url, limits=limited(concurrency=10, rate=100))
    async with run_proxy_app(config, RecordingCredentials()) as proxy:
        base = proxy_url(proxy)
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "17"
            assert response.headers["X-RateLimit-Remaining"] == "0"
            assert response.headers["Content-Type"] == "application/problem+json"
            assert await response.read() == b'{"message": "slow down"}'
        assert upstream.hits == 1
        assert await metric_value(client, base, 'pleo_proxy_rate_limited_total{reason="rate"}') == 0


async def test_one_connection_over_its_rate_leaves_another_served(
    sandbox: RunningSandbox, upstream: EchoUpstream, tmp_path: Path
) -> None:
    config = connections_config(sandbox.url, tmp_path, names=[("acme", None), ("globex", None)])
    await distinct_companies(sandbox.url, config)
    await give_tokens(config, ["acme", "globex"])
    # Tokens from the sandbox, API calls to the recording upstream.
    config = replace(
        config,
        pleo=replace(config.pleo, api_url=upstream.url),
        limits=limited(rate=0.01, burst=2),
    )
    async with serving(config), aiohttp.ClientSession() as session:
        base = url_of(config)

        async def status(path: str, headers: dict[str, str] | None = None) -> int:
            async with session.get(f"{base}{path}", headers=headers) as response:
                await response.read()
                return response.status

        acme = [await status("/c/acme/v1/expenses") for _ in range(4)]
        assert acme == [200, 200, 429, 429]
        headers = {"X-Pleo-Connection": "globex"}
        assert [await status("/v1/expenses", headers=headers) for _ in range(2)] == [200, 200]
        assert await status("/c/acme/v1/expenses") == 429
        assert upstream.hits == 4
        tokens = {seen.authorization for seen in upstream.seen}
        assert len(tokens) == 2  # two acme requests with one token, two globex with another
        async with session.get(f"{base}/_proxy/metrics") as response:
            text = await response.text()
        # Counted by reason; no connection's name in any series (thousands would blow up).
        assert 'pleo_proxy_rate_limited_total{reason="rate"} 3.0' in text.splitlines()
        assert "acme" not in text
        assert "globex" not in text
