"""proxy/http/retries.py: opt-in upstream retries.

The decisions as pure functions first (Retry-After forms, backoff bounds, which
outcomes and requests may be retried), then against a real recording upstream: the hit
count shows exactly how often each request reached it. Timing is asserted as lower
bounds only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, Refresh, Timeouts, Upstream
from proxy.errors import UpstreamConnectTimeout, UpstreamTimeout, UpstreamUnreachable
from proxy.http.retries import (
    BACKOFF_BASE,
    RetryPlan,
    Verdict,
    backoff,
    failure_reason,
    judge,
    parse_retry_after,
)
from tests.proxyproc import RecordingCredentials, metric_value, proxy_config, run_proxy_app
from tests.upstreams import EchoUpstream, Seen, dead_port, echo_json, upstream

__all__ = ["upstream"]  # a fixture, used by name

NOW = 1_700_000_000.0
RETRIES = 'pleo_proxy_upstream_retries_total{reason="%s"}'
GIVEN_UP = 'pleo_proxy_upstream_retries_given_up_total{reason="%s"}'


# --- the decisions ---


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        (" 0 ", 0.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: now
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),  # NOW + 30 as written by a server
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850 form
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime form: no zone, GMT all the same
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("²", None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(
    value: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_backoff_is_full_jitter_under_a_doubling_ceiling() -> None:
    assert backoff(0, 10, lambda: 0.0) == 0
    assert backoff(0, 10, lambda: 1.0) == BACKOFF_BASE
    assert backoff(3, 10, lambda: 1.0) == BACKOFF_BASE * 8
    assert backoff(3, 10, lambda: 0.5) == BACKOFF_BASE * 4
    assert backoff(40, 10, lambda: 1.0) == 10  # the cap, and no overflow
    assert backoff(5, 0, lambda: 1.0) == 0


@pytest.mark.parametrize(
    ("method", "replayable", "retries"),
    [
        ("GET", True, 3),
        ("head", True, 3),
        ("OPTIONS", True, 3),
        ("PUT", True, 3),
        ("DELETE", True, 3),
        ("PUT", False, 0),  # a streamed body cannot be sent twice
        ("POST", True, 0),
        ("PATCH", True, 0),
        ("TRACE", True, 0),
        ("PROPFIND", True, 0),
    ],
)
def test_only_idempotent_requests_with_a_kept_body_are_retried(
    method: str, replayable: bool, retries: int
) -> None:
    plan = RetryPlan.for_request(Upstream(retries=3), method, replayable=replayable)
    assert plan == RetryPlan(retries=retries, cap=10.0)


def test_which_failures_are_worth_a_retry() -> None:
    assert [failure_reason(s, None) for s in (429, 502, 503, 504)] == ["429", "502", "503", "504"]
    assert [failure_reason(s, None) for s in (200, 401, 404, 500, 501)] == [None] * 5
    assert failure_reason(None, UpstreamUnreachable("reset")) == "connection_error"
    assert failure_reason(None, UpstreamConnectTimeout("connect")) == "connection_error"
    # Pleo had the request and may still be working on it.
    assert failure_reason(None, UpstreamTimeout("read")) is None


def test_judge_waits_backs_off_or_passes_the_outcome_on() -> None:
    plan = RetryPlan(retries=2, cap=10)

    def decide(attempt: int, reason: str | None, retry_after: float | None = None) -> Verdict:
        return judge(plan, attempt, reason=reason, retry_after=retry_after, rand=lambda: 1.0)

    assert decide(0, None) == Verdict()
    assert decide(0, "503") == Verdict(wait=BACKOFF_BASE)
    assert decide(1, "connection_error") == Verdict(wait=BACKOFF_BASE * 2)
    assert decide(0, "429", 3) == Verdict(wait=3)
    assert decide(0, "429", 10) == Verdict(wait=10)  # the cap itself is still waited
    assert decide(0, "429", 11) == Verdict(gave_up="retry_after_over_cap")
    assert decide(2, "503") == Verdict(gave_up="exhausted")
    off = RetryPlan(retries=0)
    assert judge(off, 0, reason="503", retry_after=None) == Verdict()  # nothing to count


# --- against a real upstream ---


@dataclass
class Script:
    """Answers upstream hits in order: a status (with headers), then echoes from there on."""

    answers: list[tuple[int, dict[str, str]]]
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        self.bodies.append(seen.body)
        if self.answers:
            status, headers = self.answers.pop(0)
            return web.Response(status=status, headers=headers, body=f"answer {status}")
        return web.json_response(echo_json(seen))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def retrying(api_url: str, *, retries: int = 3, cap: float = 10.0, **sections: Any) -> Config:
    return proxy_config(
        api_url, upstream=Upstream(retries=retries, retry_after_cap=cap), **sections
    )


@asynccontextmanager
async def proxy_for(
    config: Config, credentials: RecordingCredentials | None = None
) -> AsyncIterator[str]:
    """The proxy serving `config` with a recording credential source; yields its base URL."""
    async with run_proxy_app(config, credentials or RecordingCredentials()) as server:
        yield f"http://127.0.0.1:{server.port}"


async def test_get_is_retried_until_pleo_answers(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.respond = Script([(503, {}), (502, {}), (504, {}), (429, {})])
    async with proxy_for(retrying(upstream.url, retries=4, cap=0.1)) as base:
        async with client.get(f"{base}/v1/expenses?page=2") as response:
            assert response.status == 200
            assert (await response.json())["raw_path"] == "/v1/expenses?page=2"
        assert upstream.hits == 5
        assert [s.raw_path for s in upstream.seen] == ["/v1/expenses?page=2"] * 5
        for reason in ("503", "502", "504", "429"):
            assert await metric_value(client, base, RETRIES % reason) == 1
        assert await metric_value(client, base, GIVEN_UP % "exhausted") == 0


async def test_a_kept_body_is_sent_again_byte_for_byte(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    script = Script([(503, {})])
    upstream.respond = script
    async with proxy_for(retrying(upstream.url, cap=0.1)) as base:
        async with client.put(f"{base}/v1/tags/7", data=b'{"name": "travel"}') as response:
            assert response.status == 200
        assert upstream.hits == 2
    assert script.bodies == [b'{"name": "travel"}'] * 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_and_patch_are_never_retried(
    upstream: EchoUpstream, client: aiohttp.ClientSession, method: str
) -> None:
    upstream.respond = Script([(503, {"X-Pleo": "busy"})] * 5)
    async with proxy_for(retrying(upstream.url, cap=0.1)) as base:
        async with client.request(method, f"{base}/v1/expenses", data=b"{}") as response:
            assert response.status == 503
            assert response.headers["X-Pleo"] == "busy"
            assert await response.text() == "answer 503"
        assert upstream.hits == 1
        assert await metric_value(client, base, RETRIES % "503") == 0


async def test_a_streamed_body_is_never_retried(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.respond = Script([(503, {})] * 5)
    config = retrying(upstream.url, cap=0.1, refresh=Refresh(replay_body_limit=16))
    async with proxy_for(config) as base:
        async with client.put(f"{base}/v1/files/1", data=b"x" * 1000) as response:
            assert response.status == 503
        assert upstream.hits == 1


async def test_retries_run_out_and_pleos_last_answer_goes_back(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.respond = Script([(503, {"X-Attempt": str(i)}) for i in range(10)])
    async with proxy_for(retrying(upstream.url, retries=2, cap=0.1)) as base:
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 503
            assert response.headers["X-Attempt"] == "2"
            assert await response.text() == "answer 503"
        assert upstream.hits == 3
        assert await metric_value(client, base, RETRIES % "503") == 2
        assert await metric_value(client, base, GIVEN_UP % "exhausted") == 1


async def test_retry_after_above_the_cap_is_answered_at_once_with_pleos_headers(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    headers = {"Retry-After": "120", "X-RateLimit-Reset": "120", "Content-Type": "text/plain"}
    upstream.respond = Script([(429, headers)])
    async with proxy_for(retrying(upstream.url, cap=10)) as base:
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "120"
            assert response.headers["X-RateLimit-Reset"] == "120"
            assert await response.text() == "answer 429"
        assert upstream.hits == 1
        assert await metric_value(client, base, GIVEN_UP % "retry_after_over_cap") == 1
        assert await metric_value(client, base, RETRIES % "429") == 0


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_within_the_cap_is_waited(
    upstream: EchoUpstream, client: aiohttp.ClientSession, form: str
) -> None:
    # An HTTP-date has whole seconds: 3 s ahead is at least 2 s ahead when it is read.
    value = "1" if form == "seconds" else formatdate(time.time() + 3, usegmt=True)
    upstream.respond = Script([(503, {"Retry-After": value})])
    async with proxy_for(retrying(upstream.url, cap=10)) as base:
        started = time.monotonic()
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 200
        assert time.monotonic() - started >= 0.99  # lower bound only: machines are noisy
        assert upstream.hits == 2


async def test_connection_errors_are_retried(client: aiohttp.ClientSession) -> None:
    with dead_port() as port:
        async with proxy_for(retrying(f"http://127.0.0.1:{port}", retries=2, cap=0.1)) as base:
            async with client.get(f"{base}/v1/expenses") as response:
                assert response.status == 502
                assert (await response.json())["error"] == "upstream_unreachable"
            assert await metric_value(client, base, RETRIES % "connection_error") == 2
            assert await metric_value(client, base, GIVEN_UP % "exhausted") == 1


async def test_a_dropped_connection_is_retried_until_pleo_answers(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def drop_three(request: web.Request, seen: Seen) -> web.StreamResponse:
        if upstream.hits <= 3:
            assert request.transport is not None
            request.transport.abort()  # before any answer byte
            return web.Response()
        return web.json_response(echo_json(seen))

    upstream.respond = drop_three
    async with proxy_for(retrying(upstream.url, retries=5, cap=0.1)) as base:
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 200
        assert upstream.hits == 4
        # aiohttp itself resends an idempotent request once on a dropped connection, so
        # how many of the drops were ours to retry is aiohttp's business; at least one.
        assert await metric_value(client, base, RETRIES % "connection_error") >= 1


async def test_a_read_timeout_is_not_retried(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def stall(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    upstream.respond = stall
    timeouts = Timeouts(connect=5.0, read=0.3, shutdown=5.0)
    async with proxy_for(retrying(upstream.url, cap=0.1, timeouts=timeouts)) as base:
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 504
        assert upstream.hits == 1
        assert await metric_value(client, base, RETRIES % "connection_error") == 0


async def test_nothing_is_retried_once_the_answer_has_started(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    async def cut(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = 10_000
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.respond = cut
    async with proxy_for(retrying(upstream.url, cap=0.1)) as base:
        async with client.get(f"{base}/v1/export") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert upstream.hits == 1


@pytest.mark.parametrize(
    "order", [["401", "503"], ["503", "401"]], ids=["401-then-503", "503-then-401"]
)
async def test_retries_compose_with_the_401_replay(
    upstream: EchoUpstream, client: aiohttp.ClientSession, order: list[str]
) -> None:
    async def pleo(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.authorization == "Bearer token-1" and "401" in order:
            if order[0] == "503":
                order.pop(0)
                return web.Response(status=503)
            order.remove("401")
            return web.Response(status=401)
        if order:
            order.pop(0)
            return web.Response(status=503)
        return web.json_response(echo_json(seen))

    credentials = RecordingCredentials()
    upstream.respond = pleo
    async with proxy_for(retrying(upstream.url, cap=0.1), credentials) as base:
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 200
        assert upstream.hits == 3
        assert credentials.rejected == ["Bearer token-1"]  # one refresh, not one per attempt
        assert upstream.seen[-1].authorization == "Bearer token-2"


async def test_without_upstream_retries_nothing_changes(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.respond = Script([(503, {"Retry-After": "1"})] * 3)
    async with proxy_for(proxy_config(upstream.url)) as base:  # upstream.retries: 0
        async with client.get(f"{base}/v1/expenses") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
        assert upstream.hits == 1
        assert await metric_value(client, base, RETRIES % "503") == 0
        assert await metric_value(client, base, GIVEN_UP % "exhausted") == 0
    with dead_port() as port:
        async with proxy_for(proxy_config(f"http://127.0.0.1:{port}")) as base:
            async with client.get(f"{base}/v1/expenses") as response:
                assert response.status == 502
            assert await metric_value(client, base, RETRIES % "connection_error") == 0
