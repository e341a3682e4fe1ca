"""The OAuth 2.0 wire protocol with Pleo: authorise URL, code exchange, refresh, introspection.

Exactly one HTTP attempt per call, and every failure becomes an `OAuthError` subclass
(`classify_error`). Must not store, schedule, lock or retry: `tokens` owns all of that.
No token, code or secret ever goes into an exception message.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import math
import re
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, quote_plus, unquote_plus, urlencode, urlsplit, urlunsplit

import aiohttp

from proxy.config import Pleo
from proxy.errors import (
    ClientRejected,
    ConfigError,
    OAuthError,
    Problem,
    ReauthorizationRequired,
    TransientOAuthError,
)
from proxy.lifecycle.livetime import live_timeout
from proxy.secret import Secret
from proxy.tokenset import TokenSet

GrantKind = Literal["authorization_code", "refresh_token"]

# An old Pleo page said access tokens live 15 minutes; the current docs only say "see
# expires_in". If a response ever omits it, assume 15 min: a shorter real lifetime is
# caught by the 401 → refresh → replay path.
DEFAULT_EXPIRES_IN = 900.0
# Token answers are a few hundred bytes; the bound keeps a broken endpoint from filling memory.
MAX_RESPONSE_BYTES = 64 * 1024
# RFC 6749 §5.2 codes are lowercase ASCII with underscores; anything else is not echoed,
# since a server could put a token (or the `error_description` text) in the field.
ERROR_CODE_RE = re.compile(r"^[a-z_]{1,64}$")
# Pleo: "invalid_grant or invalid_token" end the grant; third-party Pleo clients also see
# `invalid_refresh_token` (sometimes only inside the description, hence the body check).
REAUTH_CODES = frozenset({"invalid_grant", "invalid_token", "invalid_refresh_token"})
REAUTH_QUIRK = b"invalid_refresh_token"
CLIENT_CODES = frozenset({"invalid_client", "unauthorized_client"})


@dataclass(frozen=True)
class Subject:
    """Who a credential acts for, from `GET /v1/introspect` (no secrets)."""

    subject_urn: str | None
    company_name: str | None
    scopes: tuple[str, ...]
    application_name: str | None


def build_authorize_url(pleo: Pleo, *, state: str, code_challenge: str) -> str:
    """Pleo's authorise URL for one authorisation request (code flow, PKCE S256)."""
    params = {
        "response_type": "code",
        "client_id": _client_id(pleo),
        "redirect_uri": pleo.redirect_uri,
        "scope": " ".join(pleo.scopes),
        "state": state,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    parts = urlsplit(pleo.authorize_url)
    encoded = urlencode(params, quote_via=quote)  # %20, not '+', between scopes
    query = "&".join([*_foreign_query_pieces(parts.query, ours=params.keys()), encoded])
    # RFC 6749 §3.1: the endpoint URI must not carry a fragment, so none is kept.
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _foreign_query_pieces(query: str, *, ours: Collection[str]) -> list[str]:
    """The configured URL's own query pieces, verbatim, minus any parameter we set."""
    pieces = [p for p in query.split("&") if p]
    return [p for p in pieces if unquote_plus(p.split("=", 1)[0]) not in ours]


def _client_id(pleo: Pleo) -> str:
    if not pleo.client_id:
        raise ConfigError([Problem("pleo.client_id", "required for OAuth")])
    return pleo.client_id


def client_auth(pleo: Pleo) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, body fields) that authenticate the client: never both methods at once."""
    client_id = _client_id(pleo)
    if pleo.client_secret is None:
        # A public client (RFC 6749 §2.1) only identifies itself; PKCE protects the code.
        return {}, {"client_id": client_id}
    if pleo.token_auth_method == "client_secret_post":  # noqa: S105 (a method name)
        return {}, {"client_id": client_id, "client_secret": pleo.client_secret.reveal()}
    return {"Authorization": basic_authorization(client_id, pleo.client_secret).reveal()}, {}


def basic_authorization(client_id: str, client_secret: Secret) -> Secret:
    """`Basic …` for client_secret_basic: RFC 6749 §2.3.1 form-encodes both parts first."""
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret.reveal())}"
    return Secret("Basic " + base64.b64encode(pair.encode()).decode("ascii"))


async def exchange_code(
    session: aiohttp.ClientSession,
    pleo: Pleo,
    *,
    code: Secret,
    code_verifier: str,
    timeout: float,  # noqa: ASYNC109 (the contract: aiohttp's per-request total timeout)
    now: float,
) -> TokenSet:
    """Trade an authorisation code (with its PKCE verifier) for tokens: one attempt."""
    form = {
        "grant_type": "authorization_code",
        "code": code.reveal(),
        "redirect_uri": pleo.redirect_uri,
        "code_verifier": code_verifier,
    }
    status, body, retry_after = await _post_token(session, pleo, form, timeout=timeout)
    if not 200 <= status < 300:
        raise classify_error(
            status, body, retry_after=retry_after, now=now, grant="authorization_code"
        )
    return parse_token_response(_json_or_none(body), now=now, requested_scopes=pleo.scopes)


async def refresh_tokens(
    session: aiohttp.ClientSession,
    pleo: Pleo,
    *,
    refresh_token: Secret,
    timeout: float,  # noqa: ASYNC109 (the contract: aiohttp's per-request total timeout)
    now: float,
) -> TokenSet:
    """Present the refresh token once and return the rotated tokens.

    A 200 that carries no usable token raises `TransientOAuthError` like a network
    failure would, but beware: Pleo may already have rotated, so the refresh token just
    presented may be spent. The caller (`tokens`) must treat a retry with it as a
    possible `invalid_grant`, never as proof that the grant has ended for another reason.
    """
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    status, body, retry_after = await _post_token(session, pleo, form, timeout=timeout)
    if not 200 <= status < 300:
        raise classify_error(status, body, retry_after=retry_after, now=now)
    return parse_token_response(
        _json_or_none(body), now=now, previous_refresh=refresh_token, requested_scopes=pleo.scopes
    )


async def _post_token(
    session: aiohttp.ClientSession,
    pleo: Pleo,
    form: dict[str, str],
    *,
    timeout: float,  # noqa: ASYNC109
) -> tuple[int, bytes, str | None]:
    """One form POST to the token endpoint: (status, body, Retry-After)."""
    headers, auth_fields = client_auth(pleo)
    headers["Accept"] = "application/json"
    # Explicit: the shared upstream session adds no Content-Type of its own.
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    async with (
        map_token_endpoint_errors(),
        # Not aiohttp's timers: after a stop they fire before Pleo's answer is read.
        live_timeout(timeout),
        session.post(
            pleo.token_url,
            data={**form, **auth_fields},  # a dict is sent form-urlencoded
            headers=headers,
            timeout=aiohttp.ClientTimeout(),
            # Never follow: a redirect would carry the code or refresh token elsewhere.
            allow_redirects=False,
        ) as response,
    ):
        body = await _read_bounded(response)
        return response.status, body, response.headers.get("Retry-After")


async def _read_bounded(response: aiohttp.ClientResponse, what: str = "token endpoint") -> bytes:
    buf = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        buf += chunk
        if len(buf) > MAX_RESPONSE_BYTES:
            raise TransientOAuthError(f"{what} answer exceeds the size limit")
    return bytes(buf)


@contextlib.asynccontextmanager
async def map_token_endpoint_errors(what: str = "token endpoint") -> AsyncIterator[None]:
    """The one boundary where aiohttp's exceptions become `TransientOAuthError`.

    Messages name the exception type only: aiohttp's own texts are not ours to vet.
    """
    try:
        yield
    except TimeoutError:
        raise TransientOAuthError(f"{what} timed out") from None
    except aiohttp.ClientError as exc:
        raise TransientOAuthError(f"{what} unreachable ({type(exc).__name__})") from None


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _no_usable_token() -> TransientOAuthError:
    return TransientOAuthError("token endpoint answered 200 without a usable token")


def parse_token_response(
    doc: object,
    *,
    now: float,
    previous_refresh: Secret | None = None,
    requested_scopes: tuple[str, ...] = (),
) -> TokenSet:
    """A successful token response → `TokenSet` (RFC 6749 §5.1).

    Garbage (not an object, no access_token, a malformed expires_in) raises
    `TransientOAuthError`; a token type other than Bearer raises `ClientRejected`, since
    asking again will not change it and the operator has to look.
    """
    if not isinstance(doc, dict):
        raise _no_usable_token()
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        raise _no_usable_token()
    token_type = _token_type(doc.get("token_type"))
    lifetime = _expires_in(doc.get("expires_in"))
    return TokenSet(
        access_token=Secret(access),
        refresh_token=_refresh_token(doc.get("refresh_token"), previous_refresh),
        expires_at=now + lifetime,
        lifetime=lifetime,
        scopes=_scopes(doc.get("scope")) or requested_scopes,
        token_type=token_type,
    )


def _token_type(raw: object) -> str:
    if raw is None:
        return "Bearer"  # Pleo does not document the field; Bearer is what the API takes
    if isinstance(raw, str) and raw.lower() == "bearer":
        return "Bearer"
    raise ClientRejected("token endpoint issued a token type other than Bearer")


def _expires_in(raw: object) -> float:
    if raw is None:
        return DEFAULT_EXPIRES_IN
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _no_usable_token()
    try:
        value = float(raw)
    except ValueError:
        raise _no_usable_token() from None
    if not math.isfinite(value) or value <= 0:
        raise _no_usable_token()
    return value


def _refresh_token(raw: object, previous: Secret | None) -> Secret | None:
    if raw is None or raw == "":
        # An old Pleo FAQ: "optionally, a new refresh token". Without one, the old stays.
        return previous
    if not isinstance(raw, str):
        raise _no_usable_token()
    return Secret(raw)


def _scopes(raw: object) -> tuple[str, ...]:
    """Granted scopes; () when absent or empty (RFC 6749 §5.1: then as requested)."""
    if not isinstance(raw, str):
        return ()
    return tuple(raw.split())


def classify_error(
    status: int,
    body: bytes,
    *,
    retry_after: str | None,
    now: float | None = None,
    grant: GrantKind = "refresh_token",
) -> OAuthError:
    """A non-2xx token-endpoint answer → the error `tokens` acts on.

    Order matters: 429/5xx are transient whatever the body says (RFC 6749 §5.2 errors
    are 400/401; a 5xx body may come from an intermediary). Then the parsed `error`
    code decides (only it is normative). A 401 without a known code means the client
    credentials; any other 4xx (invalid_request, unsupported_grant_type, invalid_scope…)
    is a client misconfiguration, reported as `ClientRejected` with the code: retrying
    the same request cannot succeed. 1xx/3xx are unexpected and treated as transient.
    """
    code = error_code(body)
    label = f"HTTP {status}" if code is None else f"{code}, HTTP {status}"
    if status == 429 or status >= 500 or status == 408:
        seconds = parse_retry_after(retry_after, now=now)
        return TransientOAuthError(
            f"token endpoint unavailable ({label})", retry_after=seconds, busy=True
        )
    if code in REAUTH_CODES or (400 <= status < 500 and REAUTH_QUIRK in body):
        return ReauthorizationRequired(
            _refused(grant, code if code in REAUTH_CODES else "invalid_refresh_token")
        )
    if 400 <= status < 500:
        return ClientRejected(f"Pleo rejected the OAuth client ({label})")
    return TransientOAuthError(f"token endpoint answered unexpectedly ({label})")


def _refused(grant: GrantKind, code: str) -> str:
    if grant == "authorization_code":
        return f"Pleo refused the authorisation code ({code})"
    return f"Pleo refused the refresh token ({code})"


def error_code(body: bytes) -> str | None:
    """The RFC 6749 §5.2 `error` code if the body is JSON and the code is well-formed."""
    doc = _json_or_none(body)
    if not isinstance(doc, dict):
        return None
    code = doc.get("error")
    if isinstance(code, str) and ERROR_CODE_RE.fullmatch(code):
        return code
    return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After (RFC 9110 §10.2.3) in seconds from now: delta-seconds or an HTTP-date.

    Unparsable → None. An HTTP-date needs `now` (epoch seconds) to become a delay.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    if now is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; a zone-less one is not a valid HTTP-date
    return max(0.0, when.timestamp() - now)


async def introspect(
    session: aiohttp.ClientSession,
    pleo: Pleo,
    *,
    authorization: Secret,
    timeout: float,  # noqa: ASYNC109
) -> Subject:
    """`GET {api_url}/v1/introspect` with a full `Authorization` value: who it acts for.

    Best-effort for the caller: every failure is a `TransientOAuthError`.
    """
    url = pleo.api_url.rstrip("/") + "/v1/introspect"
    headers = {"Authorization": authorization.reveal(), "Accept": "application/json"}
    async with (
        map_token_endpoint_errors("introspection"),
        session.get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response,
    ):
        body = await _read_bounded(response, "introspection")
        status = response.status
    if status != 200:
        raise TransientOAuthError(f"introspection answered HTTP {status}")
    return parse_introspection(_json_or_none(body))


def parse_introspection(doc: object) -> Subject:
    """Pleo's `{"data": {subjectURN, companyName?, scope, applicationName, …}}` → `Subject`."""
    data = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise TransientOAuthError("introspection answered without a usable document")
    return Subject(
        subject_urn=_str_field(data, "subjectURN"),
        company_name=_str_field(data, "companyName"),
        scopes=_scopes(data.get("scope")),
        application_name=_str_field(data, "applicationName"),
    )


def _str_field(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None
