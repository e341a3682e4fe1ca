"""Connection-state events, delivered to real receivers on loopback ports.

Each receiver is `tests.upstreams`' recording upstream with its own `respond`; the sink
is the real one, with small backoff settings so retries take milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from proxy.ops.events import (
    SIGNATURE_HEADER,
    EventSink,
    EventsSettings,
    event_body,
    loggable_origin,
    retry_delay,
    sign,
)
from proxy.secret import Secret
from tests.upstreams import EchoUpstream, Responder, Seen, dead_port, run_echo_upstream

SECRET = "whsec-5f2a9c1e7b3d4a60"
MAY_1_NOON = 1714564800.0  # 2024-05-01T12:00:00Z
FAST = EventsSettings(
    webhook_url="http://127.0.0.1:9/hook",
    webhook_secret=Secret(SECRET),
    timeout=2.0,
    max_attempts=3,
    backoff_base=0.005,
    backoff_cap=0.02,
)
BOUND = 15.0  # for waits on observable state; never reached when all is well


def fast(url: str, **changes: Any) -> EventsSettings:
    return dataclasses.replace(FAST, webhook_url=url, **changes)


def hook(receiver: EchoUpstream) -> str:
    return f"{receiver.url}/hook"


@asynccontextmanager
async def running(
    settings: EventsSettings, clock: Callable[[], float] = time.time
) -> AsyncIterator[EventSink]:
    sink = EventSink(settings, clock=clock)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close(drain=0)


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds (the observable state), failing after BOUND."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def status(code: int) -> Responder:
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.Response(status=code)

    return respond


def states(bodies: list[bytes]) -> list[str]:
    return [json.loads(body)["state"] for body in bodies]


# -- the wire form --------------------------------------------------------------------


def test_event_body_is_compact_json_with_a_utc_timestamp() -> None:
    body = event_body("acme", "authorised", "unauthorised", None, at=MAY_1_NOON + 0.25)
    assert body == (
        b'{"event":"connection.state","connection":"acme","state":"authorised",'
        b'"previous":"unauthorised","reason":null,"at":"2024-05-01T12:00:00.250Z"}'
    )


def test_sign_is_the_hex_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(SECRET.encode(), b"{}", hashlib.sha256).hexdigest()
    assert sign(b"{}", Secret(SECRET)) == f"sha256={expected}"


def test_retry_delay_is_full_jitter_under_the_cap_with_retry_after_as_a_floor() -> None:
    delays = [retry_delay(n, base=0.5, cap=8.0, retry_after=None) for n in range(20)]
    assert all(0 <= d <= min(8.0, 0.5 * 2**n) for n, d in enumerate(delays))
    assert retry_delay(0, base=0.5, cap=8.0, retry_after=3) >= 3
    assert retry_delay(0, base=0.5, cap=8.0, retry_after=3600) == 8.0
    assert retry_delay(10_000, base=0.5, cap=8.0, retry_after=None) <= 8.0


def test_only_the_receivers_origin_is_loggable() -> None:
    url = "https://user:hunter2@hooks.example:8443/services/T0/B0/XYZ?token=abc#frag"
    assert loggable_origin(url) == "https://hooks.example:8443"
    assert loggable_origin("not a url") == "[invalid url]"


def test_settings_refuse_a_webhook_without_a_secret_and_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="needs a webhook secret"):
        EventsSettings(webhook_url="https://hooks.example/")
    with pytest.raises(ValueError, match="max_attempts must be at least 1: 0"):
        dataclasses.replace(FAST, max_attempts=0)
    with pytest.raises(ValueError, match="backoff_base <= backoff_cap"):
        dataclasses.replace(FAST, backoff_base=2.0, backoff_cap=1.0)


# -- delivery -------------------------------------------------------------------------


async def test_a_receiver_verifies_the_signature_and_gets_the_exact_fields() -> None:
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver)), clock=lambda: MAY_1_NOON) as sink,
    ):
        sink.state_changed("acme", "reauthorization_required", "refreshing", "invalid_grant")
        await until(lambda: sink.delivered == 1)

    (seen,) = receiver.seen
    expected = hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(seen.headers[SIGNATURE_HEADER], f"sha256={expected}")
    assert seen.headers["Content-Type"] == "application/json"
    assert (seen.method, seen.raw_path) == ("POST", "/hook")
    assert json.loads(seen.body) == {
        "event": "connection.state",
        "connection": "acme",
        "state": "reauthorization_required",
        "previous": "refreshing",
        "reason": "invalid_grant",
        "at": "2024-05-01T12:00:00.000Z",
    }
    assert (sink.delivered, sink.failed, sink.dropped, sink.pending) == (1, 0, 0, 0)


async def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt() -> None:
    async with run_echo_upstream() as receiver, running(fast(hook(receiver))) as sink:

        async def fail_twice(request: web.Request, seen: Seen) -> web.StreamResponse:
            return web.Response(status=500 if receiver.hits <= 2 else 204)

        receiver.respond = fail_twice
        sink.state_changed("acme", "authorised", "unauthorised", None)
        await until(lambda: sink.delivered == 1)

    assert receiver.hits == 3
    assert len({(seen.body, seen.headers[SIGNATURE_HEADER]) for seen in receiver.seen}) == 1
    assert sink.failed == 0


async def test_an_always_failing_receiver_is_given_up_on_after_max_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.events")
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver), max_attempts=4)) as sink,
    ):
        receiver.respond = status(500)
        sink.state_changed("acme", "authorised", "unauthorised", None)
        await until(lambda: sink.failed == 1)
        await asyncio.sleep(0.1)  # room for a fifth attempt, were there one

    assert receiver.hits == 4
    assert (sink.delivered, sink.pending) == (0, 0)
    (record,) = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "events.failed"
    ]
    assert record.fields["problem"] == "status 500"  # type: ignore[attr-defined]
    assert record.fields["receiver"] == receiver.url  # type: ignore[attr-defined]


async def test_retry_after_on_429_is_waited_for() -> None:
    arrivals: list[float] = []
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver), backoff_cap=2.0)) as sink,
    ):

        async def slow_down_once(request: web.Request, seen: Seen) -> web.StreamResponse:
            arrivals.append(time.monotonic())
            if receiver.hits == 1:
                return web.Response(status=429, headers={"Retry-After": "1"})
            return web.Response(status=200)

        receiver.respond = slow_down_once
        sink.state_changed("acme", "authorised", "unauthorised", None)
        await until(lambda: sink.delivered == 1)

    # Jitter alone would retry within backoff_base (5 ms); only a lower bound is timed.
    assert arrivals[1] - arrivals[0] >= 0.9


async def test_a_retry_after_beyond_the_cap_waits_only_the_cap() -> None:
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver), backoff_cap=0.05)) as sink,
    ):

        async def busy_once(request: web.Request, seen: Seen) -> web.StreamResponse:
            if receiver.hits == 1:
                return web.Response(status=503, headers={"Retry-After": "3600"})
            return web.Response(status=200)

        receiver.respond = busy_once
        sink.state_changed("acme", "authorised", "unauthorised", None)
        await until(lambda: sink.delivered == 1)  # an hour would fail the BOUND

    assert receiver.hits == 2


async def test_events_arrive_in_order_even_when_attempts_fail() -> None:
    accepted: list[bytes] = []
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver), max_attempts=2)) as sink,
    ):

        async def fail_every_other(request: web.Request, seen: Seen) -> web.StreamResponse:
            if receiver.hits % 2:
                return web.Response(status=502)
            accepted.append(seen.body)
            return web.Response(status=202)

        receiver.respond = fail_every_other
        emitted = [f"s{n}" for n in range(20)]
        for state in emitted:
            sink.state_changed("acme", state, None, None)
        await until(lambda: sink.delivered == 20)

    assert states(accepted) == emitted


async def test_a_dead_port_is_retried_then_given_up_without_raising() -> None:
    with dead_port() as port:
        async with running(fast(f"http://127.0.0.1:{port}/hook")) as sink:
            sink.state_changed("acme", "authorised", "unauthorised", None)
            await until(lambda: sink.failed == 1)
    assert (sink.delivered, sink.dropped, sink.pending) == (0, 0, 0)


async def test_a_hanging_receiver_never_slows_state_changed() -> None:
    recovered = asyncio.Event()
    async with (
        run_echo_upstream() as receiver,
        running(fast(hook(receiver), timeout=0.2, max_attempts=50, queue_limit=100)) as sink,
    ):

        async def hang_until_recovered(request: web.Request, seen: Seen) -> web.StreamResponse:
            if not recovered.is_set():
                await asyncio.sleep(30)  # far beyond the timeout
            return web.Response(status=204)

        receiver.respond = hang_until_recovered
        sink.state_changed("acme", "s-first", None, None)
        await until(lambda: receiver.hits == 1)  # the sender is stuck in that POST

        started = time.perf_counter()
        for n in range(1000):
            sink.state_changed("acme", f"s{n}", None, None)
        assert time.perf_counter() - started < 1.0  # generous: the point is "never waits"

        recovered.set()
        await until(lambda: sink.pending == 0)

    delivered = states([seen.body for seen in receiver.seen[1:]])
    assert delivered[-1] == "s999"
    assert sink.delivered + sink.failed + sink.dropped == 1001


async def test_a_full_queue_drops_the_oldest_and_warns_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.events")
    async with run_echo_upstream() as receiver:
        sink = EventSink(fast(hook(receiver), queue_limit=3))
        for n in range(10):  # before start: nothing drains the queue
            sink.state_changed("acme", f"s{n}", None, None)
        assert (sink.dropped, sink.pending) == (7, 3)

        await sink.start()
        await until(lambda: sink.delivered == 3)
        for n in range(10, 15):  # a second burst: nothing runs between these calls
            sink.state_changed("acme", f"s{n}", None, None)
        await until(lambda: sink.delivered == 6)
        await sink.close()

    assert states([seen.body for seen in receiver.seen]) == ["s7", "s8", "s9", "s12", "s13", "s14"]
    assert sink.dropped == 9
    warnings = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "events.dropped"
    ]
    assert len(warnings) == 2


async def test_close_delivers_what_is_queued() -> None:
    async with run_echo_upstream() as receiver:
        sink = EventSink(fast(hook(receiver)))
        await sink.start()
        for n in range(5):
            sink.state_changed("acme", f"s{n}", None, None)
        await sink.close(drain=BOUND)

    assert states([seen.body for seen in receiver.seen]) == ["s0", "s1", "s2", "s3", "s4"]
    assert (sink.delivered, sink.pending) == (5, 0)


async def test_close_gives_up_after_the_drain_and_counts_what_is_left() -> None:
    async with run_echo_upstream() as receiver:

        async def hang(request: web.Request, seen: Seen) -> web.StreamResponse:
            await asyncio.sleep(30)
            return web.Response(status=204)

        receiver.respond = hang
        sink = EventSink(fast(hook(receiver), timeout=10.0))
        await sink.start()
        for n in range(3):
            sink.state_changed("acme", f"s{n}", None, None)
        await until(lambda: receiver.hits == 1)
        await asyncio.wait_for(sink.close(drain=0.1), BOUND)

        assert (sink.delivered, sink.failed, sink.dropped, sink.pending) == (0, 0, 3, 0)
        sink.state_changed("acme", "late", None, None)  # after close: logged and counted
        assert (sink.dropped, sink.pending) == (4, 0)


# -- secrets and the no-webhook case ----------------------------------------------------


async def test_no_secret_in_the_body_the_headers_or_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.events")
    async with run_echo_upstream() as receiver:
        url = receiver.url.replace("http://", "http://hookuser:hunter2-pw@") + "/h?key=q-cred"
        async with running(fast(url, max_attempts=2)) as sink:
            sink.state_changed(
                "acme", "authorised", "unauthorised", "refresh_token=rt-91b2c3d4e5f6"
            )
            await until(lambda: sink.delivered == 1)
            receiver.respond = status(500)
            sink.state_changed("acme", "refreshing", "authorised", None)
            await until(lambda: sink.failed == 1)

    for seen in receiver.seen:
        assert SECRET.encode() not in seen.body
        assert b"rt-91b2c3d4e5f6" not in seen.body
        assert all(SECRET not in value for value in seen.headers.values())
        expected = hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
        assert seen.headers[SIGNATURE_HEADER] == f"sha256={expected}"
    logged = caplog.text + "".join(repr(vars(r)) for r in caplog.records)
    for secret in (SECRET, "hunter2-pw", "q-cred", "rt-91b2c3d4e5f6"):
        assert secret not in logged


async def test_without_a_webhook_state_changed_only_logs_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.events")
    tasks_before = asyncio.all_tasks()
    sink = EventSink(EventsSettings())
    await sink.start()
    assert asyncio.all_tasks() == tasks_before  # no sender, no session
    sink.state_changed("acme", "reauthorization_required", "authorised", "invalid_grant")
    await sink.close()

    (record,) = [r for r in caplog.records if r.name == "proxy.events"]
    assert record.levelno == logging.INFO
    assert record.fields == {  # type: ignore[attr-defined]
        "event": "connection.state",
        "connection": "acme",
        "state": "reauthorization_required",
        "previous": "authorised",
        "reason": "invalid_grant",
    }
    assert (sink.pending, sink.delivered, sink.dropped) == (0, 0, 0)
    assert sink.changes == {"reauthorization_required": 1}
    assert sink.receiver is None


async def test_misuse_is_refused_with_exact_messages() -> None:
    sink = EventSink(EventsSettings())
    await sink.start()
    with pytest.raises(RuntimeError, match=r"^event sink already started$"):
        await sink.start()
    await sink.close()
    await sink.close()  # harmless
    with pytest.raises(RuntimeError, match=r"^event sink is closed$"):
        await sink.start()
