"""The token manager's pure rules: states, refresh timing, backoff, the header value.

No I/O and no clock of its own (sans-IO, mitmproxy's way): `proxy.lifecycle.manager` drives these
with its injected clock, and most of their cases are plain synchronous tests.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.config import Refresh
from proxy.secret import Secret
from proxy.tokenset import StoredState, TokenSet

# Bounds of the one retry loop for the token endpoint (vault agent's rule: only here).
MAX_ATTEMPTS = 4
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
# An instance without a usable token re-reads the shared store at most this often.
REREAD_INTERVAL = 1.0
# The background task never sleeps longer than this, so it notices store changes.
BACKGROUND_TICK = 1.0
INTERRUPTED_REASON = "a refresh was interrupted"


class TokenState(enum.Enum):
    UNAUTHORISED = "unauthorised"
    AUTHORISED = "authorised"
    REFRESHING = "refreshing"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"


StateListener = Callable[["TokenState"], None]


class TokenEvents:
    """Hooks for what the manager does (metrics); the base class ignores them.

    Outcomes: ok, transient, invalid_grant, client_rejected, adopted (another process
    had already refreshed), lock_lost (the store fenced out this attempt's write),
    interrupted (another holder's refresh was given up on). Only fixed words and
    numbers: never a token.
    """

    def refreshed(self, outcome: str) -> None:
        """A refresh attempt ended with `outcome`."""

    def lock_waited(self, seconds: float) -> None:
        """The store's refresh lock was granted after `seconds`."""

    def state_changed(self, previous: TokenState, state: TokenState, reason: str | None) -> None:
        """The connection went from `previous` to `state` (`reason`: why a grant ended)."""


def steady_deadline(tokens: TokenSet, *, wall_now: float, steady_now: float) -> float:
    """When `tokens` expire on the steady clock, judged when they arrive in this process.

    What the wall clock says is left, but never more than a whole lifetime: a wall clock
    stepped back since they were issued cannot lengthen them. Judge once per token set
    (later wall readings may be stepped); for tokens this process just obtained, what is
    left is their lifetime less the time the answer took.
    """
    return steady_now + min(tokens.expires_at - wall_now, tokens.lifetime)


def effective_expiry(
    tokens: TokenSet, deadline: float | None, *, wall_now: float, steady_now: float
) -> float:
    """The expiry to judge `tokens` by, in wall-clock terms: the earlier of the stored one
    and the steady `deadline` (None: not known, the stored one alone).

    A wall clock stepped back cannot keep an expired token in service or a refresh late; a
    wall clock stepped forward, or a resume after a suspend (the steady clock counts it),
    makes tokens due at once, as they are at Pleo.
    """
    if deadline is None:
        return tokens.expires_at
    return min(tokens.expires_at, wall_now + (deadline - steady_now))


def refresh_margin(tokens: TokenSet, before_expiry: float) -> float:
    """Seconds before expiry at which to refresh: min(before_expiry, lifetime / 2)."""
    return max(0.0, min(before_expiry, tokens.lifetime / 2))


def bearer(tokens: TokenSet) -> Secret:
    """The Authorization header value for `tokens`."""
    return Secret(f"Bearer {tokens.access_token.reveal()}")


def backoff_delay(attempt: int, *, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when larger."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))  # noqa: S311
    return max(delay, min(retry_after or 0.0, BACKOFF_CAP * 4))


def iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class RefreshRequest:
    """Why a refresh is wanted: a rejected token, a proactive/keep-alive due, or expiry."""

    rejected: Secret | None = None  # the header Pleo answered 401 to
    fresh_for: float = 0.0  # the token must stay valid this much longer to skip the refresh
    force: bool = False  # keep-alive: refresh even if still fresh
    urgent: bool = True  # a request waits for it: served before background refreshes


def with_scopes(tokens: TokenSet, scopes: tuple[str, ...]) -> TokenSet:
    return dataclasses.replace(tokens, scopes=scopes)


def state_of(stored: StoredState | None) -> TokenState:
    """The state an entry means on its own (a refresh in flight is the manager's to know)."""
    if stored is None or (stored.tokens is None and stored.reauth_reason is None):
        return TokenState.UNAUTHORISED
    if stored.tokens is None or stored.reauth_reason is not None:
        return TokenState.REAUTHORIZATION_REQUIRED
    return TokenState.AUTHORISED


@dataclasses.dataclass(frozen=True)
class Due:
    """When a connection's next background refresh is due, and which kind it is."""

    at: float
    keepalive: bool  # False: proactive, before the access token expires


def spread(token: float, fraction: float) -> float:
    """A stable share in [0, fraction) for one token (its expiry), so connections that
    were authorised or imported together do not all come due in the same second."""
    digest = hashlib.sha256(repr(token).encode()).digest()
    return fraction * int.from_bytes(digest[:4], "big") / 2**32


def refresh_due(
    stored: StoredState | None,
    refresh: Refresh,
    *,
    now: float,
    last_used: float,
    jitter: bool = False,
    expires_at: float | None = None,
) -> Due | None:
    """When a connection's background refresh is due, or None while it has no grant.

    Keep-alive after `refresh.keepalive` in any case; proactively before expiry only for
    a connection used within the last access-token lifetime. With `jitter`, proactive
    refreshes come up to a quarter of the margin early and keep-alives up to a tenth of
    their period early, spread by token. `expires_at`: the expiry to judge by (see
    `effective_expiry`), the stored one by default; the spread stays keyed on the stored.
    """
    if stored is None or stored.tokens is None or stored.reauth_reason is not None:
        return None
    tokens = stored.tokens
    since = stored.last_refresh_at or stored.obtained_at or now
    keepalive = since + refresh.keepalive
    if jitter:
        keepalive -= spread(tokens.expires_at, refresh.keepalive / 10)
    if now - last_used > tokens.lifetime:
        return Due(keepalive, keepalive=True)
    margin = refresh_margin(tokens, refresh.before_expiry)
    proactive = (tokens.expires_at if expires_at is None else expires_at) - margin
    if jitter:
        proactive -= spread(tokens.expires_at, margin / 4)
    return Due(keepalive, True) if keepalive < proactive else Due(proactive, False)


def status_body(
    stored: StoredState | None, state: TokenState, *, reason: str | None, page_url: str
) -> dict[str, Any]:
    """The status JSON of the contract: never a secret."""
    stored = stored or StoredState()
    tokens = stored.tokens
    body: dict[str, Any] = {
        "state": state.value,
        "expires_at": iso_utc(tokens.expires_at) if tokens else None,
        "scopes": list(tokens.scopes) if tokens else [],
        "subject": stored.subject,
        "company": stored.company_name,
        "last_refresh": {
            "at": iso_utc(stored.last_refresh_at),
            "outcome": stored.last_refresh_outcome,
        },
        "refresh_count": stored.refresh_count,
        "reason": stored.reauth_reason or reason,
        "authorize_url": page_url if tokens is None else None,
    }
    # Other connections that authorised the same Pleo subject (the same customer twice).
    twins = stored.extra.get("same_subject_as")
    if twins:
        body["same_subject_as"] = list(twins)
    return body


def token_digest(secret: Secret) -> str:
    """SHA-256 hex of a token or header: names it in a refresh request without carrying it."""
    return hashlib.sha256(secret.reveal().encode()).hexdigest()


def same_digest(digest: str, secret: Secret) -> bool:
    """Whether `digest` is `secret`'s (constant time: one side may come from a client)."""
    return hmac.compare_digest(digest, token_digest(secret))


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A `RefreshRequest` as the check after the lock needs it, naming tokens by digest only.

    `rejected`: the digest of the header Pleo answered 401 to; `mine`: the digest of the
    access token the asking process holds (None when it holds none); `mine_until`: the
    wall-clock time until which the asker judges that token valid (`effective_expiry`,
    its steady clock included; None: its stored expiry). This is all a refresh helper in
    another process is told: no token travels with a request.
    """

    rejected: str | None = None
    mine: str | None = None
    fresh_for: float = 0.0
    force: bool = False
    urgent: bool = True
    mine_until: float | None = None

    @classmethod
    def of(
        cls, request: RefreshRequest, mine: TokenSet | None, *, mine_until: float | None = None
    ) -> Wanted:
        return cls(
            rejected=token_digest(request.rejected) if request.rejected is not None else None,
            mine=token_digest(mine.access_token) if mine is not None else None,
            fresh_for=request.fresh_for,
            force=request.force,
            urgent=request.urgent,
            mine_until=mine_until if mine is not None else None,
        )
