"""Opt-in upstream retries (`upstream.retries`): which requests, which failures, what wait.

Owns the policy (GET, HEAD, OPTIONS, PUT, DELETE with a kept body; a failed connect or
a dropped connection, and 429, 502, 503, 504), the waits (exponential backoff with full
jitter, or Pleo's Retry-After up to `upstream.retry_after_cap`) and the loop around one
send. It runs before any answer byte reaches the client. Must not touch credentials (the
401 replay sits above it), read bodies, or see aiohttp exceptions (forward maps them).
"""

from __future__ import annotations

import asyncio
import calendar
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from proxy.config import Upstream
from proxy.errors import UpstreamConnectTimeout, UpstreamError, UpstreamUnreachable

# RFC 9110 §9.2.2 idempotent methods, minus TRACE (never worth repeating).
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE = 0.2  # seconds: the first wait is up to this, doubling per attempt


class Answer(Protocol):
    """What the loop needs of an upstream response (aiohttp's ClientResponse has it)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def close(self) -> None: ...


class RetryEvents(Protocol):
    """Where retries are counted (proxy.ops.metrics.Metrics)."""

    def upstream_retried(self, reason: str) -> None: ...

    def upstream_gave_up(self, reason: str) -> None: ...


A = TypeVar("A", bound=Answer)


@dataclass(frozen=True)
class RetryPlan:
    """How many retries one request may have, and the longest wait before one."""

    retries: int = 0
    cap: float = 10.0

    @classmethod
    def for_request(cls, upstream: Upstream, method: str, *, replayable: bool) -> RetryPlan:
        """No retries for POST, PATCH and the like, nor for a body streamed once."""
        if not upstream.retries or not replayable or method.upper() not in RETRYABLE_METHODS:
            return NO_RETRIES  # the default: no plan built per request
        return cls(retries=upstream.retries, cap=upstream.retry_after_cap)


NO_RETRIES = RetryPlan()


@dataclass(frozen=True)
class Verdict:
    """After one attempt: wait this long and try again, or pass the outcome on."""

    wait: float | None = None  # None: pass the outcome on
    gave_up: str | None = None  # why a retryable outcome is passed on (metrics)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from `Retry-After` (RFC 9110 §10.2.3: delta-seconds or an
    HTTP-date); None when absent or malformed. `now` is wall-clock time."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # not str.isdigit alone: it admits '²'
        return float(text)
    parsed = email.utils.parsedate_tz(text)
    if parsed is None:
        return None
    # An HTTP-date is in GMT; the obsolete asctime form carries no zone at all.
    when = calendar.timegm(parsed[:9]) - (parsed[9] or 0)
    return max(0.0, when - now)


def backoff(attempt: int, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: uniform over [0, min(cap, BACKOFF_BASE · 2^attempt)], so clients
    that failed together do not all come back together."""
    return rand() * min(cap, BACKOFF_BASE * 2.0 ** min(attempt, 30))


def failure_reason(status: int | None, error: UpstreamError | None) -> str | None:
    """The metric reason when the outcome is worth retrying, else None.

    A read timeout is not: Pleo has the request and may still be working on it, so a
    retry adds load where it hurts and multiplies the client's wait by timeouts.read.
    A failed connect (nothing reached Pleo) and a dropped connection are.
    """
    if error is not None:
        retryable = isinstance(error, UpstreamUnreachable | UpstreamConnectTimeout)
        return "connection_error" if retryable else None
    return str(status) if status in RETRYABLE_STATUSES else None


def judge(
    plan: RetryPlan,
    attempt: int,
    *,
    reason: str | None,
    retry_after: float | None,
    rand: Callable[[], float] = random.random,
) -> Verdict:
    """The decision after attempt number `attempt` (0 for the first) failed with `reason`."""
    if reason is None or plan.retries == 0:
        return Verdict()
    if attempt >= plan.retries:
        return Verdict(gave_up="exhausted")
    if retry_after is None:
        return Verdict(wait=backoff(attempt, plan.cap, rand))
    if retry_after > plan.cap:
        # Pleo asked for longer than we may hold the client: its answer, headers and
        # all, goes back at once so the client can decide.
        return Verdict(gave_up="retry_after_over_cap")
    return Verdict(wait=retry_after)


async def _attempt(send: Callable[[], Awaitable[A]]) -> A | UpstreamError:
    try:
        return await send()
    except UpstreamError as err:
        return err


def _assess(outcome: Answer | UpstreamError, *, now: float) -> tuple[str | None, float | None]:
    """(why the outcome is worth a retry or None, Pleo's Retry-After in seconds or None)."""
    if isinstance(outcome, UpstreamError):
        return failure_reason(None, outcome), None
    reason = failure_reason(outcome.status, None)
    if reason is None:
        return None, None
    return reason, parse_retry_after(outcome.headers.get("Retry-After"), now=now)


async def send_with_retries(
    send: Callable[[], Awaitable[A]],
    plan: RetryPlan,
    *,
    events: RetryEvents | None = None,
    clock: Callable[[], float] = time.time,
) -> A:
    """`send()` once, or again after each retryable failure while `plan` allows."""
    attempt = 0
    while True:
        outcome = await _attempt(send)
        reason, retry_after = _assess(outcome, now=clock())
        verdict = judge(plan, attempt, reason=reason, retry_after=retry_after)
        if verdict.wait is None:
            if verdict.gave_up is not None and events is not None:
                events.upstream_gave_up(verdict.gave_up)
            if isinstance(outcome, UpstreamError):
                raise outcome
            return outcome
        if not isinstance(outcome, UpstreamError):
            outcome.close()  # a failed answer's body is not worth draining
        if events is not None and reason is not None:
            events.upstream_retried(reason)
        await asyncio.sleep(verdict.wait)
        attempt += 1
