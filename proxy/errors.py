"""The exception tree: every error the proxy raises on purpose, with its stable code.

    ProxyError
    ├── ConfigError                 bad configuration (exit 2; `path.to.key: message` lines)
    ├── StoreError                  token store unreadable, corrupt, foreign or unwritable
    │   ├── LockTimeout             the cross-process refresh lock was not had in time
    │   └── FencedOut               a write refused: the lock lapsed or the entry moved on
    ├── OAuthError                  the token endpoint refused or failed
    │   ├── ReauthorizationRequired the grant has ended; a person must consent again (503)
    │   ├── ClientRejected          invalid_client / unauthorized_client (503, tokens kept)
    │   └── TransientOAuthError     network, timeout, 5xx, 429: worth retrying later
    ├── ClientBodyTimeout           the client stopped sending its request body (408)
    ├── RateLimited                 over the connection's limits.per_connection (429)
    ├── ConnectionNotAllowed        the client key is limited to other connections (403)
    ├── SelectionError              which connection a request means is unclear
    │   ├── UnknownConnection       no connection of that name (404)
    │   ├── ConnectionRequired      several connections and no `default`: name one (400)
    │   ├── InvalidConnectionName   not `^[a-z0-9][a-z0-9._-]{0,62}$` (400)
    │   └── ConnectionMismatch      the header, prefix and port name different ones (400)
    └── UpstreamError               the Pleo API could not be reached
        ├── UpstreamBusy            no upstream connection free in time (503)
        ├── UpstreamUnreachable     connect failed or connection reset (502)
        └── UpstreamTimeout         no byte within the read timeout (504)
            └── UpstreamConnectTimeout  not even connected within the connect timeout

Visibility policy: a message is built from non-secret fields only (a config key path,
an HTTP status, an OAuth `error` code, a file path). It may be shown to a client or a
terminal as it is. Token values, refresh tokens, codes, client secrets and API keys
never appear in a message; they travel as `proxy.secret.Secret` and are masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""

    code: ClassVar[str] = "proxy_error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def body(self) -> dict[str, Any]:
        """The JSON body a client receives for this error."""
        return {"error": self.code, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        """Response headers that go with the body (none unless the error needs them)."""
        return {}


FILE_PROBLEM_PATH = "(file)"  # the path of config problems about the file as a whole


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where it is and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(ProxyError):
    code = "config_error"
    status = 500

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class StoreError(ProxyError):
    code = "store_error"
    status = 503


class LockTimeout(StoreError):
    code = "lock_timeout"
    status = 503


class FencedOut(StoreError):
    """A fenced write was refused and nothing was written: the writer's lock lapsed (it
    expired, or another instance holds it now) or the entry changed since it was read.

    The writer must not act on what it meant to write (tokens it meant to store are not
    the store's, a refresh token it meant to present may be another's): it re-reads.
    """

    code = "lock_lost"
    status = 503


class OAuthError(ProxyError):
    code = "oauth_error"
    status = 503


class ReauthorizationRequired(OAuthError):
    code = "reauthorization_required"
    status = 503

    def __init__(self, detail: str, *, authorize_url: str | None = None) -> None:
        super().__init__(detail)
        self.authorize_url = authorize_url

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "authorize_url": self.authorize_url, "detail": self.detail}


class ClientRejected(OAuthError):
    code = "client_rejected"
    status = 503


class TransientOAuthError(OAuthError):
    code = "token_endpoint_unavailable"
    status = 503

    def __init__(
        self, detail: str, *, retry_after: float | None = None, busy: bool = False
    ) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.busy = busy  # Pleo itself said 429 or 5xx: every connection should wait


class ClientBodyTimeout(ProxyError):
    code = "request_timeout"
    status = 408


class RateLimited(ProxyError):
    """Refused by the proxy itself, before anything is forwarded; `reason` is
    `concurrency` or `rate`, `retry_after` whole seconds (at least 1)."""

    code = "rate_limited"
    status = 429

    def __init__(self, detail: str, *, reason: str, retry_after: int) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ConnectionNotAllowed(ProxyError):
    code = "connection_not_allowed"
    status = 403


class SelectionError(ProxyError):
    code = "connection_selection_error"
    status = 400


class UnknownConnection(SelectionError):
    code = "unknown_connection"
    status = 404


class ConnectionRequired(SelectionError):
    code = "connection_required"
    status = 400


class InvalidConnectionName(SelectionError):
    code = "invalid_connection_name"
    status = 400


class ConnectionMismatch(SelectionError):
    code = "connection_mismatch"
    status = 400


class UpstreamError(ProxyError):
    code = "upstream_error"
    status = 502


class UpstreamBusy(UpstreamError):
    """Every upstream connection stayed in use for `upstream.queue_timeout`."""

    code = "upstream_busy"
    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"
    status = 502


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    status = 504


class UpstreamConnectTimeout(UpstreamTimeout):
    """Not connected within the connect timeout: nothing reached Pleo (so safe to retry)."""
