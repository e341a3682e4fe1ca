"""The sandbox's in-memory world: settings, knobs, grants, codes, tokens and counters.

Owns every rule about which code or token is valid (single-use codes, PKCE, rotation,
reuse detection, expiry). Must not speak HTTP: the handler modules translate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_COMPANY_ID = "3f6b1c2e-8d4a-4f7b-9c0e-5a2d7e1f4b86"
# The token endpoint's failure modes a test can ask for (see Knobs.token_failure_mode).
FAILURE_MODES = frozenset({"500", "503", "429", "timeout", "garbage", "no_refresh_token", "reset"})
# RFC 7636 §4.1: 43-128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
VERIFIER_RE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
PENDING_REQUEST_TTL = 600.0
OMIT_REFRESH_MODE = "no_refresh_token"  # the one mode that answers successfully
DEFAULT_FAILURE_MODE = "500"  # seconds a consent page stays answerable


@dataclass(frozen=True)
class SandboxSettings:
    """How the fake Pleo starts; knobs may change some of it at run time."""

    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"  # noqa: S105 - the sandbox's public fake secret
    redirect_uris: tuple[str, ...] = ("http://localhost:8080/_proxy/callback",)
    allowed_scopes: tuple[str, ...] = (
        "users:read",
        "export-jobs:read",
        "export-jobs:write",
        "accounting-entries:write",
        "test:test",
    )
    access_ttl: float = 900.0
    code_ttl: float = 60.0
    auto_approve: bool = False
    company_id: str = DEFAULT_COMPANY_ID
    company_name: str = "Sandbox Company ApS"


@dataclass(frozen=True)
class Knobs:
    """What tests may change over HTTP while the sandbox runs."""

    redirect_uris: tuple[str, ...]
    access_ttl: float
    auto_approve: bool
    token_failures: int = 0
    token_failure_mode: str = DEFAULT_FAILURE_MODE
    api_401_once: bool = False
    latency: float = 0.0
    # Added to token-endpoint answers only (a token endpoint far away, a near API).
    token_latency: float = 0.0
    # Each new grant its own company (subject and name) instead of the settings' one.
    distinct_companies: bool = False


@dataclass
class Stats:
    """Counters a test reads to see what a proxy did (reset by /_sandbox/reset-stats)."""

    code_grants: int = 0
    refresh_grants: int = 0
    token_requests: int = 0
    reuse_detected: int = 0
    api_requests: int = 0
    api_by_path: dict[str, int] = field(default_factory=dict)
    last_upload: dict[str, Any] | None = None
    # The most token requests being answered at once (what a proxy's cap is measured by).
    token_in_flight_max: int = 0
    # API requests refused because their bearer, a grant's current access token, had
    # expired: what a proxy that judges expiry right never sends.
    expired_tokens: int = 0


@dataclass
class Grant:
    """One consent: its scopes, company, and the only access/refresh tokens now alive."""

    id: str
    client_id: str
    scopes: tuple[str, ...]
    subject: str
    company_name: str
    access_token: str = ""
    access_expires_at: float = 0.0
    refresh_token: str = ""
    revoked: bool = False
    refreshes: int = 0  # successful refresh grants
    reuse_detected: int = 0  # spent refresh tokens that came back


@dataclass(frozen=True)
class AuthRequest:
    """A validated authorise request, waiting for consent or turned into a code."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str
    code_challenge: str


@dataclass
class AuthCode:
    request: AuthRequest
    expires_at: float
    used: bool = False
    grant_id: str | None = None  # the grant this code produced, revoked if it is replayed


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int
    scopes: tuple[str, ...]


class TokenError(Exception):
    """An OAuth error answer; the description never contains a token or code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class SandboxState:
    """Everything the fake Pleo remembers; one instance per app, under STATE_KEY."""

    def __init__(
        self, settings: SandboxSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.knobs = Knobs(
            redirect_uris=settings.redirect_uris,
            access_ttl=settings.access_ttl,
            auto_approve=settings.auto_approve,
        )
        self.stats = Stats()
        # Set on shutdown so deliberate sleeps (latency, "timeout") end and close() is quick.
        self.closing = asyncio.Event()
        self._grants: dict[str, Grant] = {}
        self._access: dict[str, str] = {}  # access token → grant id
        self._refresh: dict[str, str] = {}  # every refresh token ever issued → grant id
        self._codes: dict[str, AuthCode] = {}
        self._pending: dict[str, tuple[AuthRequest, float]] = {}
        self.token_in_flight = 0

    # -- authorisation requests and codes -------------------------------------------

    def park_request(self, request: AuthRequest) -> str:
        """Keep a request while the consent page is shown; the page holds only the id."""
        request_id = secrets.token_urlsafe(16)
        self._pending[request_id] = (request, self.clock() + PENDING_REQUEST_TTL)
        return request_id

    def take_request(self, request_id: str) -> AuthRequest | None:
        """The parked request, once; None when unknown, already decided or expired."""
        entry = self._pending.pop(request_id, None)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def issue_code(self, request: AuthRequest) -> str:
        code = "sbx_code_" + secrets.token_urlsafe(24)
        self._codes[code] = AuthCode(request, self.clock() + self.settings.code_ttl)
        return code

    # -- token endpoint -------------------------------------------------------------

    def exchange_code(
        self, code: str, *, client_id: str, redirect_uri: str, verifier: str
    ) -> IssuedTokens:
        entry = self._codes.get(code)
        if entry is None:
            raise TokenError("invalid_grant", "unknown authorization code")
        if entry.used:
            # RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for.
            if entry.grant_id is not None:
                self.revoke_grant(entry.grant_id)
            raise TokenError("invalid_grant", "authorization code already used")
        entry.used = True  # single use, even when this attempt fails
        self._check_code(entry, client_id=client_id, redirect_uri=redirect_uri, verifier=verifier)
        grant = self._new_grant(entry.request)
        entry.grant_id = grant.id
        self.stats.code_grants += 1
        return self._rotate(grant)

    def _check_code(
        self, entry: AuthCode, *, client_id: str, redirect_uri: str, verifier: str
    ) -> None:
        if entry.expires_at <= self.clock():
            raise TokenError("invalid_grant", "authorization code expired")
        if entry.request.client_id != client_id:
            raise TokenError("invalid_grant", "authorization code was issued to another client")
        if entry.request.redirect_uri != redirect_uri:
            raise TokenError("invalid_grant", "redirect_uri does not match the authorize request")
        if VERIFIER_RE.fullmatch(verifier) is None:
            raise TokenError("invalid_grant", "code_verifier is not 43-128 unreserved characters")
        if not hmac.compare_digest(s256(verifier), entry.request.code_challenge):
            raise TokenError("invalid_grant", "code_verifier does not match the code_challenge")

    def refresh(self, refresh_token: str, *, client_id: str) -> IssuedTokens:
        grant = self._grants.get(self._refresh.get(refresh_token, ""))
        if grant is None or grant.client_id != client_id:
            raise TokenError("invalid_grant", "unknown refresh token")
        if not hmac.compare_digest(grant.refresh_token, refresh_token):
            # A spent refresh token came back: someone holds a copy. Pleo's replay rule
            # invalidates every token of the authorisation.
            self.stats.reuse_detected += 1
            grant.reuse_detected += 1
            self.revoke_grant(grant.id)
            raise TokenError("invalid_grant", "refresh token already used; grant revoked")
        if grant.revoked:
            raise TokenError("invalid_grant", "grant revoked")
        self.stats.refresh_grants += 1
        grant.refreshes += 1
        return self._rotate(grant)

    def mint(
        self, count: int, *, client_id: str, ttl_min: float, ttl_max: float, seed: int = 0
    ) -> list[dict[str, Any]]:
        """`count` consented grants at once, each its own company, their first access token
        living between `ttl_min` and `ttl_max` seconds (tests of many connections)."""
        rng = random.Random(seed)  # noqa: S311 - spread of test lifetimes, not security
        out = []
        for _ in range(count):
            grant = self._new_grant(
                AuthRequest(client_id, "", self.settings.allowed_scopes, "", ""), distinct=True
            )
            issued = self._rotate(grant, ttl=rng.uniform(ttl_min, ttl_max))
            out.append(
                {
                    "access_token": issued.access_token,
                    "refresh_token": issued.refresh_token,
                    "expires_in": issued.expires_in,
                    "subject": grant.subject,
                }
            )
        return out

    def _new_grant(self, request: AuthRequest, *, distinct: bool = False) -> Grant:
        if distinct or self.knobs.distinct_companies:
            # n is the grant's place among all grants, so names never repeat.
            company_id = str(uuid.uuid4())
            company_name = f"Sandbox Company {len(self._grants) + 1}"
        else:
            company_id, company_name = self.settings.company_id, self.settings.company_name
        grant = Grant(
            id="grant_" + secrets.token_hex(8),
            client_id=request.client_id,
            scopes=request.scopes,
            subject=f"urn:pleo:company:{company_id}",
            company_name=company_name,
        )
        self._grants[grant.id] = grant
        return grant

    def _rotate(self, grant: Grant, *, ttl: float | None = None) -> IssuedTokens:
        """New access and refresh token; the previous pair is dead from this moment."""
        self._access.pop(grant.access_token, None)
        ttl = self.knobs.access_ttl if ttl is None else ttl
        grant.access_token = "sbx_at_" + secrets.token_urlsafe(32)
        grant.access_expires_at = self.clock() + ttl
        grant.refresh_token = "sbx_rt_" + secrets.token_urlsafe(32)
        self._access[grant.access_token] = grant.id
        self._refresh[grant.refresh_token] = grant.id
        return IssuedTokens(
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            expires_in=max(1, math.ceil(ttl)),
            scopes=grant.scopes,
        )

    # -- API side -------------------------------------------------------------------

    def grant_for_access_token(self, token: str) -> Grant | None:
        """The live grant this access token belongs to; None if unknown/expired/revoked."""
        grant = self._grants.get(self._access.get(token, ""))
        if grant is None or grant.revoked:
            return None
        if not hmac.compare_digest(grant.access_token, token):
            return None
        if grant.access_expires_at <= self.clock():
            self.stats.expired_tokens += 1
            return None
        return grant

    def revoke_grant(self, grant_id: str) -> None:
        grant = self._grants[grant_id]
        grant.revoked = True
        self._access.pop(grant.access_token, None)

    def revoke_grants(self, *, subject: str | None = None) -> int:
        """Revoke every live grant (the user disconnected the app), or only those of one
        subject (one company disconnected); returns how many."""
        live = [
            g.id
            for g in self._grants.values()
            if not g.revoked and (subject is None or g.subject == subject)
        ]
        for grant_id in live:
            self.revoke_grant(grant_id)
        return len(live)

    def grants_json(self) -> list[dict[str, Any]]:
        """Every grant ever made, oldest first, without its tokens."""
        return [
            {
                "id": g.id,
                "subject": g.subject,
                "company_name": g.company_name,
                "revoked": g.revoked,
                "refreshes": g.refreshes,
                "reuse_detected": g.reuse_detected,
            }
            for g in self._grants.values()
        ]

    # -- knobs and stats ------------------------------------------------------------

    def set_knobs(self, changes: Mapping[str, object]) -> None:
        """Apply all changes or none; ValueError names the offending knob."""
        self.knobs = dataclasses.replace(self.knobs, **validate_knobs(changes))

    def take_token_failure(self) -> str | None:
        """The failure mode for this token call, consuming one; None to answer normally."""
        knobs = self.knobs
        if knobs.token_failures <= 0 or knobs.token_failure_mode == OMIT_REFRESH_MODE:
            return None
        self.knobs = dataclasses.replace(knobs, token_failures=knobs.token_failures - 1)
        return knobs.token_failure_mode

    def take_refresh_token_omission(self) -> bool:
        """Whether this successful token answer leaves out the refresh token (consumes one)."""
        knobs = self.knobs
        if knobs.token_failures <= 0 or knobs.token_failure_mode != OMIT_REFRESH_MODE:
            return False
        self.knobs = dataclasses.replace(knobs, token_failures=knobs.token_failures - 1)
        return True

    def take_api_401(self) -> bool:
        if not self.knobs.api_401_once:
            return False
        self.knobs = dataclasses.replace(self.knobs, api_401_once=False)
        return True

    def count_api_request(self, path: str) -> None:
        self.stats.api_requests += 1
        self.stats.api_by_path[path] = self.stats.api_by_path.get(path, 0) + 1

    def reset_stats(self) -> None:
        self.stats = Stats()

    def stats_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self.stats)
        body["active_grants"] = sum(1 for g in self._grants.values() if not g.revoked)
        return body

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake early when the sandbox shuts down."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)


def validate_knobs(changes: Mapping[str, object]) -> dict[str, Any]:
    """Type-checked knob values by field name; ValueError for anything unknown or wrong."""
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        check = _KNOB_CHECKS.get(name)
        if check is None:
            raise ValueError(f"{name}: unknown knob")
        if not check(value):
            raise ValueError(f"{name}: invalid value")
        # Knobs is frozen and hashable-minded: lists from JSON become tuples.
        checked[name] = tuple(value) if isinstance(value, list) else value
    return checked


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_KNOB_CHECKS: dict[str, Callable[[object], bool]] = {
    "token_failures": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "token_failure_mode": lambda v: v in FAILURE_MODES,
    "api_401_once": lambda v: isinstance(v, bool),
    "distinct_companies": lambda v: isinstance(v, bool),
    "auto_approve": lambda v: isinstance(v, bool),
    "latency": lambda v: _is_number(v) and float(v) >= 0,  # type: ignore[arg-type]
    "token_latency": lambda v: _is_number(v) and float(v) >= 0,  # type: ignore[arg-type]
    "access_ttl": lambda v: _is_number(v) and float(v) > 0,  # type: ignore[arg-type]
    "redirect_uris": lambda v: isinstance(v, list) and all(isinstance(u, str) for u in v),
}

STATE_KEY = web.AppKey("sandbox_state", SandboxState)
