"""What the proxy and its refresh helper say to each other over their socketpair.

Frames are a 4-byte big-endian length and a JSON object. The proxy's first frame is the
helper's settings (the only frame that holds a secret: the client secret, the store key
source); then each request names a connection and a `Wanted` (tokens by digest only),
and each answer carries the outcome of one `RefreshSequence` run, the state it left in
the store, what the helper keeps to write later (`Pending`), and the events to count.
A `discard` frame tells the helper to drop what it keeps for a connection (a logout), a
`promote` frame that a request now waits for a refresh asked for in the background.
Must not do I/O beyond the two streams, nor log.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import Config, Pleo, Refresh, Timeouts, TokensConfig
from proxy.errors import (
    ClientRejected,
    FencedOut,
    LockTimeout,
    OAuthError,
    ProxyError,
    ReauthorizationRequired,
    StoreError,
    TransientOAuthError,
)
from proxy.lifecycle.refresh import GrantEnded, NothingToRefresh, Pending, Refreshed
from proxy.lifecycle.rules import TokenEvents, Wanted
from proxy.secret import Secret
from proxy.tokenset import StoredState, state_from_json, state_to_json

PROTOCOL = 1
MAX_FRAME = 1024 * 1024  # answers are a few kilobytes; the bound keeps a bad peer small
HEADER = struct.Struct(">I")
# Failures that cross the socket, by the name the answer gives them.
FAILURES: dict[str, type[ProxyError]] = {
    "client_rejected": ClientRejected,
    "fenced_out": FencedOut,
    "lock_timeout": LockTimeout,
    "store": StoreError,
    "reauthorization": ReauthorizationRequired,
    "transient": TransientOAuthError,
    "oauth": OAuthError,
}


class WireError(Exception):
    """The peer sent something that is not a frame of this protocol."""


async def send(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    post(writer, doc)
    await writer.drain()


def post(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    """`send` without waiting for the peer to take it (for small frames)."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    writer.write(HEADER.pack(len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None when the peer closed its end between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("the peer closed its end inside a frame") from None
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes is over the limit")
    try:
        doc = json.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise WireError("the peer closed its end inside a frame") from None
    except ValueError:
        raise WireError("a frame is not JSON") from None
    if not isinstance(doc, dict):
        raise WireError("a frame is not a JSON object")
    return doc


# -- settings: the first frame -----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the helper needs: the Pleo client, the store, timeouts, and how to log."""

    config: Config
    key_environ: dict[str, str]  # PLEO_PROXY_KEY / CREDENTIALS_DIRECTORY, if the proxy has them
    proxy_url: str | None = None  # HTTPS_PROXY as the proxy resolved it for the token URL
    proxy_login: str | None = None
    proxy_password: str | None = None
    log_level: str = "info"
    log_format: str = "text"


def settings_doc(settings: Settings) -> dict[str, Any]:
    """The first frame. Holds the client secret and perhaps the store key: never log it."""
    pleo, tokens, timeouts = settings.config.pleo, settings.config.tokens, settings.config.timeouts
    return {
        "protocol": PROTOCOL,
        "pleo": {
            "environment": pleo.environment,
            "api_url": pleo.api_url,
            "authorize_url": pleo.authorize_url,
            "token_url": pleo.token_url,
            "client_id": pleo.client_id,
            "client_secret": pleo.client_secret.reveal() if pleo.client_secret else None,
            "token_auth_method": pleo.token_auth_method,
            "scopes": list(pleo.scopes),
            "redirect_uri": pleo.redirect_uri,
            "ca_file": str(pleo.ca_file) if pleo.ca_file else None,
        },
        "tokens": {
            "store": tokens.store,
            "path": str(tokens.path),
            "key_file": str(tokens.key_file),
            "redis_url": tokens.redis_url,
        },
        "timeouts": _timeouts_doc(timeouts),
        "max_concurrent": settings.config.refresh.max_concurrent,
        "max_per_second": settings.config.refresh.max_per_second,
        "key_environ": settings.key_environ,
        "proxy": [settings.proxy_url, settings.proxy_login, settings.proxy_password],
        "log": [settings.log_level, settings.log_format],
    }


def parse_settings(doc: dict[str, Any]) -> Settings:
    """The settings of a first frame; WireError if it is not one of this protocol."""
    if doc.get("protocol") != PROTOCOL:
        raise WireError(f"protocol {doc.get('protocol')!r}, expected {PROTOCOL}")
    try:
        pleo, tokens = doc["pleo"], doc["tokens"]
        secret = pleo.pop("client_secret")
        ca_file = pleo.pop("ca_file")
        config = Config(
            pleo=Pleo(
                **{**pleo, "scopes": tuple(pleo["scopes"])},
                client_secret=Secret(secret) if secret is not None else None,
                ca_file=Path(ca_file) if ca_file is not None else None,
            ),
            tokens=TokensConfig(
                store=tokens["store"],
                path=Path(tokens["path"]),
                key_file=Path(tokens["key_file"]),
                redis_url=tokens["redis_url"],
            ),
            timeouts=Timeouts(**doc["timeouts"]),
            refresh=Refresh(
                max_concurrent=int(doc["max_concurrent"]),
                max_per_second=_optional_float(doc["max_per_second"]),
            ),
        )
        proxy_url, login, password = doc["proxy"]
        level, fmt = doc["log"]
        return Settings(
            config,
            {str(k): str(v) for k, v in doc["key_environ"].items()},
            proxy_url=proxy_url,
            proxy_login=login,
            proxy_password=password,
            log_level=str(level),
            log_format=str(fmt),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        # The message names no value: this frame holds secrets.
        raise WireError("the settings frame is malformed") from None


def _timeouts_doc(timeouts: Timeouts) -> dict[str, float]:
    return {
        "connect": timeouts.connect,
        "read": timeouts.read,
        "token_request": timeouts.token_request,
        "shutdown": timeouts.shutdown,
    }


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Refresh connection `name` unless the store already holds what `wanted` asks for."""

    id: int
    name: str
    wanted: Wanted
    token_request: float  # the timeout now in force (a reload may have changed it)


def request_doc(request: Request) -> dict[str, Any]:
    wanted = request.wanted
    return {
        "id": request.id,
        "name": request.name,
        "rejected": wanted.rejected,
        "mine": wanted.mine,
        "fresh_for": wanted.fresh_for,
        "force": wanted.force,
        "urgent": wanted.urgent,
        "mine_until": wanted.mine_until,
        "token_request": request.token_request,
    }


def parse_request(doc: dict[str, Any]) -> Request:
    try:
        wanted = Wanted(
            rejected=_optional_str(doc["rejected"]),
            mine=_optional_str(doc["mine"]),
            fresh_for=float(doc["fresh_for"]),
            force=bool(doc["force"]),
            urgent=bool(doc["urgent"]),
            mine_until=_optional_float(doc.get("mine_until")),
        )
        return Request(int(doc["id"]), str(doc["name"]), wanted, float(doc["token_request"]))
    except (KeyError, TypeError, ValueError):
        raise WireError("a request frame is malformed") from None


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# -- answers -------------------------------------------------------------------------------


class RecordedEvents(TokenEvents):
    """The events of one run in the helper, to be counted again by the proxy."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | float]] = []
        self.holding_lock = False  # the run got the store lock: it may reach Pleo

    def refreshed(self, outcome: str) -> None:
        self.events.append(("refreshed", outcome))

    def lock_waited(self, seconds: float) -> None:
        self.holding_lock = True
        self.events.append(("lock_waited", seconds))


def replay(events: list[Any], into: TokenEvents) -> None:
    """Count what the helper counted (fixed words and numbers only)."""
    for kind, value in events:
        if kind == "refreshed":
            into.refreshed(str(value))
        elif kind == "lock_waited":
            into.lock_waited(float(value))


def outcome_doc(result: Refreshed | BaseException) -> dict[str, Any]:
    """How one run ended; an exception's detail is our own text and names no secret."""
    if isinstance(result, Refreshed):
        return {
            "kind": "refreshed",
            "state": _state(result.stored),
            "by_us": result.by_us,
            "flushed": result.flushed,
        }
    if isinstance(result, NothingToRefresh):
        return {"kind": "nothing", "state": _state(result.stored), "detail": result.detail}
    if isinstance(result, GrantEnded):
        return {"kind": "ended", "state": _state(result.stored)}
    for kind, cls in FAILURES.items():
        if isinstance(result, cls):
            retry_after = getattr(result, "retry_after", None)
            busy = getattr(result, "busy", False)
            return {"kind": kind, "detail": result.detail, "retry_after": retry_after, "busy": busy}
    return {"kind": "transient", "detail": f"the refresh helper failed ({type(result).__name__})"}


def outcome(doc: dict[str, Any]) -> Refreshed:
    """The run's result, or its exception raised here as it was raised there."""
    kind = doc.get("kind")
    if kind == "refreshed":
        stored = _parse_state(doc["state"])
        if stored is None or stored.tokens is None:
            raise WireError("a refreshed answer holds no tokens")
        return Refreshed(
            stored, stored.tokens, by_us=bool(doc["by_us"]), flushed=bool(doc["flushed"])
        )
    if kind == "nothing":
        raise NothingToRefresh(_parse_state(doc["state"]), detail=doc.get("detail"))
    if kind == "ended":
        ended = _parse_state(doc["state"])
        if ended is None:
            raise WireError("an ended answer holds no state")
        raise GrantEnded(ended)
    cls = FAILURES.get(str(kind))
    if cls is None:
        raise WireError(f"unknown outcome {kind!r}")
    detail = str(doc.get("detail"))
    if cls is TransientOAuthError:
        raise TransientOAuthError(
            detail, retry_after=doc.get("retry_after"), busy=bool(doc.get("busy"))
        )
    raise cls(detail)


def answer_doc(
    request_id: int,
    result: Refreshed | BaseException,
    *,
    events: RecordedEvents,
    recorded: StoredState | None,
    pending: Pending | None,
) -> dict[str, Any]:
    kept = None
    if pending is not None:
        kept = {"state": _state(pending.state), "mark": _state(pending.mark)}
    return {
        "id": request_id,
        "outcome": outcome_doc(result),
        "events": events.events,
        "recorded": _state(recorded),
        "pending": kept,
    }


def discard_doc(name: str) -> dict[str, Any]:
    """Drop what is kept for `name`: a refresh result never outlives a logout."""
    return {"op": "discard", "name": name}


def promote_doc(request_id: int) -> dict[str, Any]:
    """Rank request `request_id` as urgent from now on (a request came to wait for it)."""
    return {"op": "promote", "id": request_id}


def parse_promote(doc: dict[str, Any]) -> int:
    try:
        return int(doc["id"])
    except (KeyError, TypeError, ValueError):
        raise WireError("a promote frame is malformed") from None


@dataclass(frozen=True)
class Answer:
    """An answer as the proxy reads it; `outcome()` gives the result or raises."""

    id: int
    doc: dict[str, Any]
    events: list[Any]
    recorded: StoredState | None
    pending: Pending | None  # what the helper keeps for this connection, to write later

    def outcome(self) -> Refreshed:
        return outcome(self.doc)


def parse_answer(doc: dict[str, Any]) -> Answer:
    try:
        return Answer(
            id=int(doc["id"]),
            doc=dict(doc["outcome"]),
            events=list(doc["events"]),
            recorded=_parse_state(doc["recorded"]),
            pending=_parse_pending(doc["pending"]),
        )
    except (KeyError, TypeError, ValueError):
        raise WireError("an answer frame is malformed") from None


def _parse_pending(doc: Any) -> Pending | None:
    if doc is None:
        return None
    state, mark = _parse_state(doc["state"]), _parse_state(doc["mark"])
    if state is None or mark is None:
        raise WireError("an answer's kept result is malformed")
    return Pending(state, mark)


def _state(state: StoredState | None) -> Any:
    return None if state is None else json.loads(state_to_json(state))


def _parse_state(doc: Any) -> StoredState | None:
    if doc is None:
        return None
    try:
        return state_from_json(json.dumps(doc).encode())
    except ValueError:
        raise WireError("an answer's state is malformed") from None
