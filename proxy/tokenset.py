"""What a Pleo connection is made of: the token set and the state persisted with it.

Plain values and their JSON form, shared by `oauth` (which parses token responses),
`store` (which seals the JSON) and `tokens` (which decides). No I/O here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.secret import Secret


@dataclass(frozen=True)
class TokenSet:
    """One access token with the refresh token that goes with it."""

    access_token: Secret
    refresh_token: Secret | None
    expires_at: float  # epoch seconds
    lifetime: float  # the `expires_in` Pleo granted, in seconds
    scopes: tuple[str, ...] = ()
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret

    def __repr__(self) -> str:
        return (
            f"TokenSet(access={bool(self.access_token)}, refresh={self.refresh_token is not None},"
            f" expires_at={self.expires_at:.0f})"
        )

    def is_valid(self, now: float, *, for_at_least: float = 0.0) -> bool:
        """True while the access token is unexpired for `for_at_least` more seconds."""
        return now + for_at_least < self.expires_at


@dataclass(frozen=True)
class Link:
    """A one-time connect link: the hash of its code, when it expires, where to go after."""

    code_hash: str  # sha256 hex of the code: the code itself is never stored
    expires_at: float
    return_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code_hash": self.code_hash,
            "expires_at": self.expires_at,
            "return_to": self.return_to,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Link:
        return_to = raw.get("return_to")
        return cls(
            code_hash=str(raw["code_hash"]),
            expires_at=float(raw["expires_at"]),
            return_to=str(return_to) if return_to is not None else None,
        )


@dataclass(frozen=True)
class StoredState:
    """Everything persisted for one Pleo connection (sealed by the store)."""

    tokens: TokenSet | None = None
    subject: str | None = None  # e.g. urn:pleo:company:<uuid>, from /v1/introspect
    company_name: str | None = None
    obtained_at: float | None = None
    last_refresh_at: float | None = None
    last_refresh_outcome: str | None = None  # "ok", "transient", "invalid_grant", ...
    refresh_count: int = 0
    # Written (fsync'd) before a refresh token is presented to Pleo and cleared when the
    # new tokens are persisted: if it is found set on start, a process died mid-refresh.
    refresh_started_at: float | None = None
    # Why the grant ended, when it has: other processes must see it, not retry.
    reauth_reason: str | None = None
    generation: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # The connect link a customer may use while the connection needs consent.
    link: Link | None = None

    def evolve(self, **changes: Any) -> StoredState:
        """A copy with `changes` applied and the generation bumped."""
        return replace(self, generation=self.generation + 1, **changes)


def _tokens_to_dict(tokens: TokenSet) -> dict[str, Any]:
    return {
        "access_token": tokens.access_token.reveal(),
        "refresh_token": tokens.refresh_token.reveal() if tokens.refresh_token else None,
        "expires_at": tokens.expires_at,
        "lifetime": tokens.lifetime,
        "scopes": list(tokens.scopes),
        "token_type": tokens.token_type,
    }


def _tokens_from_dict(raw: dict[str, Any]) -> TokenSet:
    refresh = raw.get("refresh_token")
    return TokenSet(
        access_token=Secret(str(raw["access_token"])),
        refresh_token=Secret(str(refresh)) if refresh else None,
        expires_at=float(raw["expires_at"]),
        lifetime=float(raw["lifetime"]),
        scopes=tuple(str(s) for s in raw.get("scopes", ())),
        token_type=str(raw.get("token_type", "Bearer")),
    )


def state_to_json(state: StoredState) -> bytes:
    """The plaintext the store seals. Holds secrets: never log it."""
    doc = {
        "version": 1,
        "tokens": _tokens_to_dict(state.tokens) if state.tokens else None,
        "subject": state.subject,
        "company_name": state.company_name,
        "obtained_at": state.obtained_at,
        "last_refresh_at": state.last_refresh_at,
        "last_refresh_outcome": state.last_refresh_outcome,
        "refresh_count": state.refresh_count,
        "refresh_started_at": state.refresh_started_at,
        "reauth_reason": state.reauth_reason,
        "generation": state.generation,
        "extra": state.extra,
        "link": state.link.to_dict() if state.link else None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def state_from_json(data: bytes) -> StoredState:
    """Parse what `state_to_json` wrote. Raises ValueError (without the content) if malformed."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("unsupported token state version")
        tokens = _tokens_from_dict(doc["tokens"]) if doc.get("tokens") else None
        return StoredState(
            tokens=tokens,
            subject=doc.get("subject"),
            company_name=doc.get("company_name"),
            obtained_at=doc.get("obtained_at"),
            last_refresh_at=doc.get("last_refresh_at"),
            last_refresh_outcome=doc.get("last_refresh_outcome"),
            refresh_count=int(doc.get("refresh_count", 0)),
            refresh_started_at=doc.get("refresh_started_at"),
            reauth_reason=doc.get("reauth_reason"),
            generation=int(doc.get("generation", 0)),
            extra=dict(doc.get("extra") or {}),
            link=Link.from_dict(doc["link"]) if doc.get("link") else None,
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        # The message names the problem's kind only: the document holds secrets.
        raise ValueError(f"malformed token state ({type(exc).__name__})") from None
