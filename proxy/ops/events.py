"""Connection-state events: a structured log line, counters, and an optional signed webhook.

Owns the event's wire form (`event_body`, and `sign` for `X-Pleo-Proxy-Signature`, public
so that receivers and tests verify with the same code), the bounded queue, and the one
sender task that POSTs each event to `events.webhook_url` in order, retrying with
exponential backoff and full jitter (a receiver's `Retry-After` on 429/503 is a floor)
until `max_attempts`. `EventSink.state_changed` is the way in: synchronous, O(1), and
never slowed or failed by a receiver that is slow or gone; a full queue drops its oldest
event (counted), so a dead receiver costs bounded memory.

Must not import the request path, the token manager or the connect flow (they call this,
never the other way round). Must never put a secret in an event, a log line or a counter:
the webhook secret is only ever an HMAC key, a reason is masked like a log line before it
leaves, and the receiver is logged by its origin alone (webhook URLs often carry a
credential in their userinfo, path or query).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
from yarl import URL

from proxy.ops.logs import redact
from proxy.secret import Secret

log = logging.getLogger("proxy.events")

EVENT_NAME = "connection.state"
SIGNATURE_HEADER = "X-Pleo-Proxy-Signature"
# The answers that mean "slow down": only on these is a Retry-After read.
RETRY_AFTER_STATUSES = frozenset({429, 503})
# A reason is prose for people ("a refresh was interrupted"), not a payload.
MAX_REASON_CHARS = 500
# 2**62 already exceeds any cap; a larger exponent would overflow the float.
_MAX_EXPONENT = 62


@dataclasses.dataclass(frozen=True)
class EventsSettings:
    """How events leave the process, e.g.
    `EventsSettings(webhook_url="https://hooks.example/pleo", webhook_secret=Secret("..."))`.

    Without `webhook_url` events are only logged and counted. `timeout` bounds one
    attempt (connect to response head); `max_attempts` counts the first one too.
    """

    webhook_url: str | None = None
    webhook_secret: Secret | None = None
    timeout: float = 5.0
    max_attempts: int = 6
    queue_limit: int = 10_000
    backoff_base: float = 0.5
    backoff_cap: float = 8.0

    def __post_init__(self) -> None:
        problem = _settings_problem(self)
        if problem is not None:
            raise ValueError(problem)


def _settings_problem(settings: EventsSettings) -> str | None:
    # Unsigned events would let anyone who can reach the receiver forge state changes.
    if settings.webhook_url is not None and not settings.webhook_secret:
        return "a webhook URL needs a webhook secret to sign with"
    if not settings.timeout > 0:
        return f"timeout must be positive: {settings.timeout}"
    if settings.max_attempts < 1:
        return f"max_attempts must be at least 1: {settings.max_attempts}"
    if settings.queue_limit < 1:
        return f"queue_limit must be at least 1: {settings.queue_limit}"
    if not 0 <= settings.backoff_base <= settings.backoff_cap:
        return "backoff needs 0 <= backoff_base <= backoff_cap"
    return None


def iso_utc(ts: float) -> str:
    """`ts` as ISO 8601 UTC with a `Z`, always to the millisecond (one shape for parsers)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_body(
    connection: str, state: str, previous: str | None, reason: str | None, *, at: float
) -> bytes:
    """The webhook's JSON body, compact and ASCII-only: the exact bytes `sign` covers."""
    doc = {
        "event": EVENT_NAME,
        "connection": connection,
        "state": state,
        "previous": previous,
        "reason": reason,
        "at": iso_utc(at),
    }
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def sign(body: bytes, secret: Secret) -> str:
    """The `X-Pleo-Proxy-Signature` value: `sha256=<hex HMAC-SHA256 of body>`.

    Receivers recompute it over the raw body and compare with `hmac.compare_digest`.
    """
    digest = hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def retry_delay(attempt: int, *, base: float, cap: float, retry_after: float | None) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): full jitter over
    `min(cap, base * 2**attempt)`, but at least the receiver's Retry-After, itself capped."""
    delay = random.uniform(0, min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT)))  # noqa: S311
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _retry_after(status: int, value: str | None) -> float | None:
    """Retry-After as delta-seconds on 429/503; the HTTP-date form is left to the jitter."""
    if status not in RETRY_AFTER_STATUSES or value is None:
        return None
    text = value.strip()
    return float(text) if text.isascii() and text.isdigit() else None


def loggable_origin(url: str) -> str:
    """Only the scheme, host and port of `url`: the part of a receiver that may be logged."""
    try:
        return str(URL(url).origin())
    except ValueError:
        return "[invalid url]"


def _clean_reason(reason: str | None) -> str | None:
    # Masked before it is cut, so that a cut cannot leave a credential too short to spot.
    return None if reason is None else redact(reason)[:MAX_REASON_CHARS]


@dataclasses.dataclass(frozen=True)
class _Webhook:
    url: str
    secret: Secret


def _webhook_of(settings: EventsSettings) -> _Webhook | None:
    if settings.webhook_url is None or settings.webhook_secret is None:
        return None  # EventsSettings refuses a URL without a secret
    return _Webhook(settings.webhook_url, settings.webhook_secret)


@dataclasses.dataclass(frozen=True)
class _Event:
    connection: str
    state: str
    body: bytes


@dataclasses.dataclass(frozen=True)
class _Attempt:
    ok: bool
    problem: str = ""  # a status or an exception's class name: never a URL or a message
    retry_after: float | None = None


class _Status(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class EventSink:
    """Logs, counts and (with a webhook) delivers every connection's state changes.

    Call `state_changed` from the event loop's thread. Counters for metrics:
    `delivered`; `failed` (given up after `max_attempts`); `dropped` (pushed out of a
    full queue, or still undelivered when `close` ends); `pending` (queued or being
    sent); `changes` (state changes by new state, webhook or not).
    """

    def __init__(self, settings: EventsSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._webhook = _webhook_of(settings)
        self._receiver = None if self._webhook is None else loggable_origin(self._webhook.url)
        self._queue: collections.deque[_Event] = collections.deque()
        self._wake = asyncio.Event()
        self._status = _Status.NEW
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending = False  # an event has left the queue and is not yet settled
        self._overflowing = False  # a drop was warned about; reset once the queue drains
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.changes: collections.Counter[str] = collections.Counter()

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._sending else 0)

    @property
    def receiver(self) -> str | None:
        """The webhook's origin (loggable), or None without a webhook."""
        return self._receiver

    # -- the way in ---------------------------------------------------------------------

    def state_changed(
        self, connection: str, state: str, previous: str | None, reason: str | None
    ) -> None:
        """Record that `connection` went from `previous` to `state`; never waits."""
        reason = _clean_reason(reason)
        self.changes[state] += 1
        log.info(
            "connection %s: %s → %s%s",
            connection,
            previous or "none",
            state,
            f" ({reason})" if reason else "",
            extra={
                "fields": {
                    "event": EVENT_NAME,
                    "connection": connection,
                    "state": state,
                    "previous": previous,
                    "reason": reason,
                }
            },
        )
        if self._webhook is None:
            return
        if self._status is _Status.CLOSED:
            self.dropped += 1  # the log line above is all that is left of it
            return
        body = event_body(connection, state, previous, reason, at=self._clock())
        self._enqueue(_Event(connection, state, body))

    def _enqueue(self, event: _Event) -> None:
        if len(self._queue) >= self._settings.queue_limit:
            self._queue.popleft()
            self._count_overflow()
        self._queue.append(event)
        self._wake.set()

    def _count_overflow(self) -> None:
        self.dropped += 1
        if self._overflowing:
            return
        self._overflowing = True
        log.warning(
            "event queue full (%d): dropping the oldest events for %s",
            self._settings.queue_limit,
            self.receiver,
            extra={
                "fields": {"event": "events.dropped", "queue_limit": self._settings.queue_limit}
            },
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the webhook's session and start the sender; without a webhook, nothing."""
        if self._status is _Status.RUNNING:
            raise RuntimeError("event sink already started")
        if self._status is _Status.CLOSED:
            raise RuntimeError("event sink is closed")
        self._status = _Status.RUNNING
        if self._webhook is None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            # No ~/.netrc and no proxy variables: the configured URL is the whole truth.
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._task = asyncio.create_task(
            self._send_all(self._session, self._webhook), name="event sender"
        )

    async def close(self, *, drain: float = 2.0) -> None:
        """Deliver what is queued for up to `drain` seconds, then cancel; close the session.

        What is still undelivered then is counted as dropped. Closing twice is harmless.
        """
        if self._status is _Status.CLOSED:
            return
        self._status = _Status.CLOSED
        self._wake.set()  # a waiting sender finds the queue empty and the sink closed
        try:
            if self._task is not None:
                await _finish(self._task, drain)
        finally:  # a sender that died of a bug still leaves no session open
            self._abandon()
            if self._session is not None:
                await self._session.close()

    def _abandon(self) -> None:
        lost = self.pending
        self._queue.clear()
        self._sending = False
        if lost:
            self.dropped += lost
            log.warning(
                "%d connection events not delivered to %s before shutdown",
                lost,
                self.receiver,
                extra={"fields": {"event": "events.abandoned", "count": lost}},
            )

    # -- the sender -------------------------------------------------------------------------

    async def _send_all(self, session: aiohttp.ClientSession, webhook: _Webhook) -> None:
        """The one sender: events leave in the order they came, one at a time."""
        while True:
            if not self._queue:
                self._overflowing = False  # the burst is over
                if self._status is _Status.CLOSED:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            event = self._queue.popleft()
            # Not reset on cancellation: `close` counts the event in flight as dropped.
            self._sending = True
            await self._deliver(session, webhook, event)
            self._sending = False

    async def _deliver(
        self, session: aiohttp.ClientSession, webhook: _Webhook, event: _Event
    ) -> None:
        """Attempts until a 2xx or `max_attempts`; a pause between attempts, none after."""
        settings = self._settings
        attempt = _Attempt(ok=False)
        for number in range(settings.max_attempts):
            if number:
                await asyncio.sleep(
                    retry_delay(
                        number - 1,
                        base=settings.backoff_base,
                        cap=settings.backoff_cap,
                        retry_after=attempt.retry_after,
                    )
                )
            attempt = await _attempt(session, webhook, event.body)
            if attempt.ok:
                self.delivered += 1
                return
            log.debug("event delivery attempt %d failed: %s", number + 1, attempt.problem)
        self.failed += 1
        self._log_given_up(event, attempt)

    def _log_given_up(self, event: _Event, attempt: _Attempt) -> None:
        log.warning(
            "gave up delivering connection %s's %s event to %s after %d attempts (%s)",
            event.connection,
            event.state,
            self.receiver,
            self._settings.max_attempts,
            attempt.problem,
            extra={
                "fields": {
                    "event": "events.failed",
                    "connection": event.connection,
                    "state": event.state,
                    "attempts": self._settings.max_attempts,
                    "problem": attempt.problem,
                    "receiver": self.receiver,
                }
            },
        )


async def _attempt(session: aiohttp.ClientSession, webhook: _Webhook, body: bytes) -> _Attempt:
    """One POST; the one place where aiohttp's exceptions become a result."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, webhook.secret)}
    try:
        # A redirect is a misconfigured receiver: retried like any other non-2xx, and the
        # event never follows it to a host nobody configured.
        async with session.post(
            webhook.url, data=body, headers=headers, allow_redirects=False
        ) as response:
            status, retry_after = response.status, response.headers.get("Retry-After")
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        return _Attempt(ok=False, problem=type(exc).__name__)
    if 200 <= status <= 299:
        return _Attempt(ok=True)
    return _Attempt(
        ok=False, problem=f"status {status}", retry_after=_retry_after(status, retry_after)
    )


async def _finish(task: asyncio.Task[None], drain: float) -> None:
    """Let `task` end by itself within `drain` seconds, else cancel it."""
    done, _ = await asyncio.wait({task}, timeout=max(0.0, drain))
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
