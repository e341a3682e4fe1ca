"""Metrics: what a scrape of `/_proxy/metrics` shows after real traffic through `serve()`."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config
from proxy.http.serve import serve
from proxy.lifecycle.manager import TokenEvents
from proxy.ops.metrics import Metrics, method_label, status_class
from tests.proxyproc import RecordingCredentials, proxy_config
from tests.upstreams import Seen, run_echo_upstream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def serving(config: Config, credentials: RecordingCredentials) -> AsyncIterator[str]:
    """`serve()` in this process on an ephemeral port; yields its base URL."""
    stop = asyncio.Event()
    listening: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(config, credentials=credentials, on_listening=listening.set_result, stop=stop)
    )
    try:
        addresses = await asyncio.wait_for(listening, 10)
        yield f"http://127.0.0.1:{addresses[0][1]}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/_proxy/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_labels_come_from_fixed_vocabularies() -> None:
    assert method_label("get") == "GET"
    assert method_label("PROPFIND") == "OTHER"
    assert method_label("X" * 500) == "OTHER"
    assert [status_class(s) for s in (101, 200, 302, 404, 503, 600)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "other",
    ]


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.refreshed("ok")
    first.request_done("GET", 200, bytes_in=0, bytes_out=10)
    assert first.registry is not second.registry
    assert b'pleo_proxy_token_refreshes_total{outcome="ok"} 1.0' in first.render()[0]
    assert b'pleo_proxy_token_refreshes_total{outcome="ok"} 0.0' in second.render()[0]
    assert isinstance(first, TokenEvents)


async def test_traffic_is_counted_by_method_status_class_and_bytes() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        status = 404 if "missing" in request.path else 200
        return web.Response(status=status, body=b"x" * 1000)

    async with run_echo_upstream() as upstream, aiohttp.ClientSession() as session:
        upstream.respond = answer
        async with serving(proxy_config(upstream.url), RecordingCredentials()) as url:
            for _ in range(3):
                async with session.get(f"{url}/v1/expenses?secret-query=1") as r:
                    assert r.status == 200
            async with session.post(f"{url}/v1/things", data=b"y" * 500) as r:
                assert r.status == 200
            async with session.get(f"{url}/v1/missing") as r:
                assert r.status == 404
            async with session.request("PROPFIND", f"{url}/v1/dav") as r:
                assert r.status == 200
            async with session.get(f"{url}/v1/x", headers={"Host": "evil.example"}) as r:
                assert r.status == 421
            samples = await scrape(session, url)
    requests = "pleo_proxy_requests_total"
    assert samples[(requests, (("method", "GET"), ("status_class", "2xx")))] == 3
    assert samples[(requests, (("method", "POST"), ("status_class", "2xx")))] == 1
    assert samples[(requests, (("method", "GET"), ("status_class", "4xx")))] == 2
    assert samples[(requests, (("method", "OTHER"), ("status_class", "2xx")))] == 1
    assert samples[("pleo_proxy_request_body_bytes_total", ())] == 500
    assert samples[("pleo_proxy_response_body_bytes_total", ())] >= 6 * 1000
    # Six requests reached the upstream (the refused one did not).
    assert samples[("pleo_proxy_upstream_seconds_count", ())] == upstream.hits == 6
    assert samples[("pleo_proxy_guard_refusals_total", (("reason", "host_not_allowed"),))] == 1
    # The scrape itself is the one request in flight.
    assert samples[("pleo_proxy_in_flight_requests", ())] == 1
    # No label holds request data: only method, status class and fixed words.
    label_names = {name for _, labels in samples for name, _ in labels}
    assert label_names <= {"method", "status_class", "reason", "result", "outcome", "state", "le"}
    label_values = {value for _, labels in samples for _, value in labels}
    assert not any("expenses" in v or "dav" in v or "evil" in v for v in label_values)


async def test_replays_after_401_are_counted_by_result() -> None:
    answers = collections.deque([401, 200, 401, 401])

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.Response(status=answers.popleft())

    credentials = RecordingCredentials(tokens=["a", "b", "c"])
    async with run_echo_upstream() as upstream, aiohttp.ClientSession() as session:
        upstream.respond = answer
        async with serving(proxy_config(upstream.url), credentials) as url:
            async with session.get(f"{url}/v1/one") as r:
                assert r.status == 200  # 401, then the replay succeeded
            async with session.get(f"{url}/v1/two") as r:
                assert r.status == 401  # 401, and the replay was refused too
            samples = await scrape(session, url)
    replays = "pleo_proxy_replays_total"
    assert samples[(replays, (("result", "ok"),))] == 1
    assert samples[(replays, (("result", "rejected"),))] == 1
    assert samples[(replays, (("result", "body_too_large"),))] == 0
    assert samples[("pleo_proxy_upstream_seconds_count", ())] == 4


async def test_without_a_token_manager_there_is_no_token_expiry() -> None:
    async with (
        run_echo_upstream() as upstream,
        aiohttp.ClientSession() as session,
        serving(proxy_config(upstream.url), RecordingCredentials()) as url,
    ):
        samples = await scrape(session, url)
    expiry = samples[("pleo_proxy_access_token_expires_in_seconds", ())]
    assert expiry != expiry  # NaN: there is no access token to expire


async def test_scrapes_of_two_apps_in_one_process_do_not_mix() -> None:
    async with (
        run_echo_upstream() as upstream,
        aiohttp.ClientSession() as session,
        serving(proxy_config(upstream.url), RecordingCredentials()) as first,
        serving(proxy_config(upstream.url), RecordingCredentials()) as second,
    ):
        async with session.get(f"{first}/v1/a") as r:
            assert r.status == 200
        one, two = await scrape(session, first), await scrape(session, second)
    key = ("pleo_proxy_requests_total", (("method", "GET"), ("status_class", "2xx")))
    assert one[key] == 1
    assert two.get(key, 0) == 0


def test_the_upstream_histogram_is_exposed_as_prometheus_client_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from proxy.ops.metrics import LATENCY_BUCKETS

    observed = [0.0, 0.004, 0.005, 0.0051, 0.3, 1, 2.5, 119.9, 120, 121, 1e6]
    ours = Metrics()
    registry = CollectorRegistry()
    reference = Histogram(
        "pleo_proxy_upstream_seconds",
        "Time until the Pleo API's response headers arrived",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    for seconds in observed:
        ours.upstream_answered(seconds)
        reference.observe(seconds)

    def lines(text: bytes) -> list[str]:
        return [
            line
            for line in text.decode().splitlines()
            if line.startswith("pleo_proxy_upstream_seconds") and "_created" not in line
        ]

    assert lines(ours.render()[0]) == lines(generate_latest(registry))
    assert len(lines(ours.render()[0])) == len(LATENCY_BUCKETS) + 3  # +Inf, count, sum
