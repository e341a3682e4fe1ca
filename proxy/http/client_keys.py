"""Client keys: who may use the proxy once it listens beyond loopback.

Owns reading the key a request presents (`Proxy-Authorization: Bearer <key>` or
`X-Proxy-Key: <key>`), matching it in constant time against every configured key, the
paths exempt from keys, and `allow_connection()`, the check made once a request's
connection is known. The guard calls `admit()`. Must not forward, select connections,
or put a key in a message or log line.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.config import CALLBACK_PATH, ClientKey
from proxy.errors import ConnectionNotAllowed
from proxy.http.keys import REFUSALS_KEY
from proxy.secret import Secret
from proxy.urls import AUTHORIZE_PATH

KEY_HEADER = "X-Proxy-Key"
PROXY_AUTHORIZATION = "Proxy-Authorization"
# Browsers cannot send a key: the authorise page and the callback (the setup code or
# link, state, cookie and PKCE protect them), and the liveness probe, which tells
# nothing. All are under /_proxy/, which is never forwarded, whatever the routes.
EXEMPT_PATHS = frozenset({"/_proxy/healthz", AUTHORIZE_PATH, CALLBACK_PATH})


class KeyProblem(enum.Enum):
    """Why a request that needs a key has none that counts (the values are refusal codes)."""

    REQUIRED = "client_key_required"
    INVALID = "client_key_invalid"


NOT_ALLOWED = "connection_not_allowed"


@dataclass(frozen=True)
class Scope:
    """What a matched key allows: every connection (None) or the named ones."""

    connections: frozenset[str] | None = None

    def allows(self, name: str | None) -> bool:
        """Whether the key may use connection `name` (None: every connection at once)."""
        if self.connections is None:
            return True
        return name is not None and name in self.connections


def _digest(value: str) -> bytes:
    # surrogateescape: aiohttp hands non-UTF-8 header bytes over as lone surrogates.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class KeyRing:
    """The configured keys as SHA-256 digests with their scopes; empty: keys are off."""

    entries: tuple[tuple[bytes, Scope], ...] = ()

    @classmethod
    def of(cls, keys: Iterable[ClientKey]) -> KeyRing:
        return cls(
            tuple(
                (
                    _digest(k.key.reveal()),
                    Scope(None if k.connections is None else frozenset(k.connections)),
                )
                for k in keys
            )
        )

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def match(self, presented: Secret) -> Scope | None:
        """The scope of the key `presented` is, or None; the same work whichever matches."""
        digest = _digest(presented.reveal())
        found: Scope | None = None
        for known, scope in self.entries:
            # Every key is compared, no early exit: the time taken does not tell which
            # key matched, or whether one did. Digests all have one length, so
            # compare_digest cannot return early on a length difference either.
            hit = hmac.compare_digest(digest, known)
            if hit and found is None:
                found = scope
        return found


def presented_key(
    proxy_authorization: Sequence[Secret], key_headers: Sequence[Secret]
) -> Secret | KeyProblem:
    """The one key the request presents; REQUIRED for none, INVALID for several or a
    `Proxy-Authorization` that is not `Bearer <key>`."""
    values = [*proxy_authorization, *key_headers]
    if not values:
        return KeyProblem.REQUIRED
    if len(values) > 1:
        return KeyProblem.INVALID  # which one would count is ambiguous: refuse both
    if proxy_authorization:
        scheme, _, key = proxy_authorization[0].reveal().strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return KeyProblem.INVALID
        return Secret(key.strip())
    key = key_headers[0].reveal().strip()
    return Secret(key) if key else KeyProblem.INVALID


def admit(
    ring: KeyRing,
    path: str,
    proxy_authorization: Sequence[Secret],
    key_headers: Sequence[Secret],
) -> Scope | KeyProblem | None:
    """The presented key's scope; a KeyProblem; None when no key is needed (keys are off,
    or `path`, decoded as the router matches it, is exempt)."""
    if not ring.enabled or path in EXEMPT_PATHS:
        return None
    key = presented_key(proxy_authorization, key_headers)
    if isinstance(key, KeyProblem):
        return key
    scope = ring.match(key)
    return KeyProblem.INVALID if scope is None else scope


SCOPE_KEY = web.RequestKey("client_key_scope", Scope)


def allow_connection(request: web.Request, name: str | None) -> None:
    """Refuse (ConnectionNotAllowed, 403, counted) when the request's key may not use
    connection `name`; None stands for every connection (metrics, the admin API, the
    process-wide status). Called before the connection is looked up, so a refusal does
    not say whether it exists."""
    scope = request.get(SCOPE_KEY)
    if scope is None or scope.allows(name):
        return
    request.app[REFUSALS_KEY][NOT_ALLOWED] += 1
    if name is None:
        detail = "this client key is limited to some connections; this endpoint covers all"
    else:
        detail = f"this client key may not use the connection {name!r}"
    raise ConnectionNotAllowed(detail)
