"""The forwarder: the catch-all handler that relays a request to the Pleo API and back.

Owns the upstream URL (raw path and query, byte-exact), hop-by-hop stripping, the
client's `Authorization` replaced by the credential source's, streaming both ways,
the one replay after a 401 (of a body proxy.http.body kept), and `raise_client_error()`,
the one place aiohttp client exceptions become `UpstreamError`s. Admission
(proxy.http.fairness) comes before the body is read; retries (proxy.http.retries)
wrap each send, below the 401 replay.
Must not parse OAuth responses, refresh tokens, decompress, or read bodies whole.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Config
from proxy.errors import (
    ClientBodyTimeout,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.http.access_log import REQUEST_ID_HEADER, add_upstream_time, request_id
from proxy.http.body import Body, read_body
from proxy.http.fairness import FAIRNESS_KEY
from proxy.http.retries import RetryPlan, send_with_retries
from proxy.http.select import connection_name, credentials_for
from proxy.http.upstream import UPSTREAM_GATE_KEY, UPSTREAM_SENDER_KEY, Reply, Sender
from proxy.lifecycle.credentials import CredentialSource
from proxy.ops.metrics import metrics_of
from proxy.ops.reload import current_config
from proxy.secret import Secret

REPLAY_HEADER = "X-Pleo-Proxy-Replay"
REPLAY_BODY_TOO_LARGE = "body-too-large"

# RFC 9110 §7.6.1: meaningful for one connection only, never relayed.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
    }
)
# Request headers we set ourselves: Host from the upstream URL, Authorization from the
# credential source; Expect is answered by us (see `defer_continue`); the connection
# selector and the client key (X-Proxy-Key; Proxy-Authorization is hop-by-hop) are ours
# alone and never leave the proxy.
REPLACED_REQUEST_HEADERS = frozenset(
    {"host", "authorization", "expect", "x-pleo-connection", "x-proxy-key"}
)
HOP_BY_HOP_RAW = frozenset(name.encode() for name in HOP_BY_HOP_HEADERS)
NOT_FORWARDED_RAW = HOP_BY_HOP_RAW | frozenset(name.encode() for name in REPLACED_REQUEST_HEADERS)
# `Connection: close` / `keep-alive` name no other header to drop.
PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b""})


# Built per request: slots, not frozen (a frozen dataclass's __init__ is ~5x slower).
@dataclass(slots=True)
class Outbound:
    """Everything about the upstream request except the Authorization value."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: Body
    timeout: aiohttp.ClientTimeout  # from the live config: a reload changes it
    retry: RetryPlan  # how many attempts upstream.retries allows this request


# What aiohttp's client raises; `raise_client_error` says what each means.
CLIENT_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError)


def raise_client_error(exc: BaseException) -> NoReturn:
    """aiohttp client exceptions → UpstreamTimeout (504) / UpstreamUnreachable (502), or
    ClientBodyTimeout when our client stopped sending the body it was relaying.

    Details name the failure kind only: never a header, URL credential or token. Called
    in an `except CLIENT_ERRORS` block (a context manager costs microseconds per use).
    """
    # aiohttp wraps a failure of the streamed request body: when the cause is our
    # client going silent, that is the answer, not an upstream failure.
    cause = _body_timeout_cause(exc)
    if cause is not None:
        raise cause from None
    raise _upstream_error(exc) from exc


def _body_timeout_cause(exc: BaseException) -> ClientBodyTimeout | None:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ClientBodyTimeout):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _upstream_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout("could not connect to the Pleo API within the timeout")
    if isinstance(exc, TimeoutError):  # also aiohttp.ServerTimeoutError and its subclasses
        return UpstreamTimeout("the Pleo API did not answer within the timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable("cannot connect to the Pleo API")
    return UpstreamUnreachable(f"the connection to the Pleo API failed ({type(exc).__name__})")


def upstream_url(api_url: str, raw_path: str) -> URL:
    """`api_url` + the raw target, byte-exact: no normalisation, no re-quoting."""
    if not raw_path.startswith("/"):
        # Cannot happen for origin-form targets (the guard admits only those); a
        # cheap belt to the guard's braces so no request ever leaves for another host:
        # after a "/" nothing can reach back into the authority (RFC 3986 §3.2).
        raise UpstreamUnreachable("the request target does not map onto the Pleo API")
    return URL(api_url.rstrip("/") + raw_path, encoded=True)


def strip_hop_by_hop(
    raw_headers: Iterable[tuple[bytes, bytes]], *, excluded: frozenset[bytes] = HOP_BY_HOP_RAW
) -> CIMultiDict[str]:
    """Headers without the lower-case names in `excluded` and those named in `Connection`.

    Built from the raw pairs so names keep the case they were sent in (aiohttp's
    parsed headers use its own canonical case for well-known names); matched as bytes,
    and only the kept pairs decoded, the way aiohttp decodes parsed headers.
    """
    return CIMultiDict(kept_headers(raw_headers, excluded=excluded))


def kept_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], *, excluded: frozenset[bytes] = HOP_BY_HOP_RAW
) -> list[tuple[str, str]]:
    """The pairs `strip_hop_by_hop` keeps, decoded, in order (no multidict built)."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    for name, value in raw_headers:
        lower = name.lower()
        if lower in excluded:
            if lower == b"connection":
                named = named or set()
                named.update(token.strip() for token in value.lower().split(b","))
            continue
        kept.append((name, value))
    if named:
        named -= PLAIN_CONNECTION_TOKENS
        if named:
            kept = [(name, value) for name, value in kept if name.lower() not in named]
    return [
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in kept
    ]


def _outbound(request: web.Request, config: Config, body: Body, raw_path: str) -> Outbound:
    headers = strip_hop_by_hop(request.raw_headers, excluded=NOT_FORWARDED_RAW)
    # Pleo sees the id our log line carries: the client's when sane, else ours.
    headers[REQUEST_ID_HEADER] = request_id(request)
    if body.parts is not None:
        # A kept body is sent with its exact length (also when it came chunked).
        headers.popall("Content-Length", None)
    url = upstream_url(config.pleo.api_url, raw_path)
    retry = RetryPlan.for_request(config.upstream, request.method, replayable=body.replayable)
    timeouts = _timeouts(config.timeouts.connect, config.timeouts.read)
    return Outbound(request.method, url, headers, body, timeouts, retry)


@functools.lru_cache(maxsize=8)
def _timeouts(connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    # One per pair of settings (a reload may change them), not one per request.
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


@dataclass(slots=True)
class _Observer:
    """Timing and replay hooks for the access log and metrics (no effect on forwarding)."""

    request: web.Request

    def upstream(self, seconds: float) -> None:
        add_upstream_time(self.request, seconds)
        metrics = metrics_of(self.request)
        if metrics is not None:
            metrics.upstream_answered(seconds)

    def replay(self, result: str) -> None:
        metrics = metrics_of(self.request)
        if metrics is not None:
            metrics.replayed(result)


def _send(
    sender: Sender, outbound: Outbound, authorization: Secret, observe: _Observer
) -> Awaitable[Reply]:
    """One exchange with Pleo: a single attempt, or more where `upstream.retries` allows.

    A plain function handing back the coroutine: no await level of its own, which every
    resumption of the exchange would pass through."""
    if not outbound.retry.retries:
        return _send_once(sender, outbound, authorization, observe)
    return send_with_retries(
        lambda: _send_once(sender, outbound, authorization, observe),
        outbound.retry,
        events=metrics_of(observe.request),
    )


async def _send_once(
    sender: Sender, outbound: Outbound, authorization: Secret, observe: _Observer
) -> Reply:
    # Set, not copied: a replay or retry of this request overwrites it with its own, and
    # the client request copies the headers it is given.
    headers = outbound.headers
    headers["Authorization"] = authorization.reveal()  # leaves the process here, to Pleo
    started = time.monotonic()
    try:
        return await sender.send(
            outbound.method, outbound.url, headers, outbound.body, outbound.timeout
        )
    except CLIENT_ERRORS as exc:
        raise_client_error(exc)
    finally:
        observe.upstream(time.monotonic() - started)


async def _exchange(
    sender: Sender,
    credentials: CredentialSource,
    outbound: Outbound,
    observe: _Observer,
) -> tuple[Reply, dict[str, str]]:
    """Send once; after a 401, replay once if the body was kept and a new credential exists."""
    sent = await credentials.authorization(replayable=outbound.body.replayable)
    first = await _send(sender, outbound, sent, observe)
    if first.status != 401:
        return first, {}
    if not outbound.body.replayable:
        observe.replay("body_too_large")
        return first, {REPLAY_HEADER: REPLAY_BODY_TOO_LARGE}
    try:
        fresh = await credentials.on_rejected(sent)
    except BaseException:
        first.close()
        raise
    if fresh is None:
        observe.replay("no_new_token")
        return first, {}
    first.close()  # the rejected answer is dropped; its connection is not worth draining
    replayed = await _send(sender, outbound, fresh, observe)
    if replayed.status == 401:
        # Another process may have rotated the grant while the replay was on its way
        # (Pleo invalidates every earlier token at once): the token it stored gets one
        # send. Nothing is refreshed for it; without one the 401 goes back as it is.
        newer = await credentials.stored_since(fresh)
        if newer is not None:
            replayed.close()
            observe.replay("rotated_meanwhile")
            replayed = await _send(sender, outbound, newer, observe)
    observe.replay("rejected" if replayed.status == 401 else "ok")
    return replayed, {}


class _CompleteResponse(web.StreamResponse):
    """Holds its head until the first body write or the end (aiohttp's web.Response does
    the same through this class attribute; unknown to another aiohttp version, it only
    costs the second write again)."""

    _send_headers_immediately = False


async def _relay_response(
    request: web.Request, upstream: Reply, extra: dict[str, str]
) -> web.StreamResponse:
    # An answer that is already all here (most small ones) goes out in one write, head
    # and body; one still arriving gets its head at once, as a stream must.
    complete = upstream.content.is_eof()
    response = (_CompleteResponse if complete else web.StreamResponse)(
        status=upstream.status, reason=upstream.reason
    )
    # Content-Length and Content-Encoding pass through as they are; the response
    # is never compressed by us, so the length stays true.
    headers = response.headers
    headers.extend(kept_headers(upstream.raw_headers))
    headers.update(extra)
    headers[REQUEST_ID_HEADER] = request_id(request)
    await response.prepare(request)
    try:
        try:
            if complete:
                # All of it is buffered already: taken at once, no read to wait for.
                await response.write_eof(upstream.content.read_nowait())
                return response
            # As it arrives, like uploads: re-cutting into exact sizes only costs copies.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except CLIENT_ERRORS as exc:
            raise_client_error(exc)
    except UpstreamError:
        # The status line is gone: the only honest signal left is a cut connection,
        # so the client sees a truncated body rather than a complete-looking one.
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


async def forward(request: web.Request) -> web.StreamResponse:
    """The catch-all handler: relay the request to the Pleo API with the credential added."""
    # Before the body is read: a request for no known connection is refused unread, and
    # so is one over its connection's limits (429, its slot held until the answer ends).
    credentials, raw_path = await credentials_for(request)
    app = request.app  # every listener's app holds the shared objects (listener_app)
    fairness = app[FAIRNESS_KEY]
    name = connection_name(credentials)
    fairness.admit(name)
    try:
        async with app[UPSTREAM_GATE_KEY]:
            return await _forward(request, credentials, raw_path)
    finally:
        fairness.release(name)


async def _forward(
    request: web.Request, credentials: CredentialSource, raw_path: str
) -> web.StreamResponse:
    config = current_config(request.app)
    sender = request.app[UPSTREAM_SENDER_KEY]
    try:
        body = await read_body(
            request, config.refresh.replay_body_limit, stall_after=config.timeouts.read
        )
        outbound = _outbound(request, config, body, raw_path)
        upstream, extra = await _exchange(sender, credentials, outbound, _Observer(request))
    except ClientBodyTimeout as err:
        # The unread rest of the body makes the connection unusable: answer and close
        # now (aiohttp would otherwise linger, reading, for up to 10 s).
        response = web.json_response(
            err.body(), status=err.status, headers={REQUEST_ID_HEADER: request_id(request)}
        )
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        if request.transport is not None:
            request.transport.close()
        return response
    try:
        return await _relay_response(request, upstream, extra)
    except BaseException:
        # Cancelled (client gone) or failed: drop the upstream connection, don't pool it.
        upstream.close()
        raise
    finally:
        upstream.release()
