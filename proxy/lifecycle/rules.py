"""The token manager's pure rules: states, refresh timing, backoff, the header value.

No I/O and no clock of its own (sans-IO, mitmproxy's way): `proxy.lifecycle.manager` drives these
with its injected clock, and most of their cases are plain synchronous tests.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable
from datetime import UTC, datetime

from proxy.secret import Secret
from proxy.tokenset import TokenSet

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
    had already refreshed). Only fixed words and numbers: never a token.
    """

    def refreshed(self, outcome: str) -> None:
        """A refresh attempt ended with `outcome`."""

    def lock_waited(self, seconds: float) -> None:
        """The store's refresh lock was granted after `seconds`."""

    def state_changed(self, previous: TokenState, state: TokenState, reason: str | None) -> None:
        """The connection went from `previous` to `state` (`reason`: why a grant ended)."""


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


def with_scopes(tokens: TokenSet, scopes: tuple[str, ...]) -> TokenSet:
    return dataclasses.replace(tokens, scopes=scopes)
