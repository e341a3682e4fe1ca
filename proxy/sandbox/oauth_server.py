"""The sandbox's authorisation server: /oauth/authorize, the consent decision, /oauth/token.

Owns the OAuth wire format and the token endpoint's failure modes. Token and code
rules live in state.py. Never redirects to an unregistered URI; never echoes a token,
code or secret in an error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import importlib.resources
import re
import socket
import string
import struct
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import MultiDictProxy, MultiMapping
from yarl import URL

from proxy.sandbox.state import STATE_KEY, AuthRequest, IssuedTokens, SandboxState, TokenError

# RFC 7636 §4.2: an S256 challenge is 32 bytes base64url without padding.
CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
FORM_TYPE = "application/x-www-form-urlencoded"


def add_oauth_routes(app: web.Application) -> None:
    app.router.add_get("/oauth/authorize", authorize)
    app.router.add_post("/oauth/authorize/decision", decide)
    app.router.add_post("/oauth/token", token)


# -- pages ----------------------------------------------------------------------------


def _template(name: str) -> string.Template:
    files = importlib.resources.files("proxy.sandbox") / "templates" / name
    return string.Template(files.read_text(encoding="utf-8"))


def error_page(message: str, *, status: int = 400) -> web.Response:
    body = _template("error.html").substitute(message=html.escape(message))
    return web.Response(status=status, text=body, content_type="text/html", headers=NO_STORE)


def consent_page(state: SandboxState, request: AuthRequest, request_id: str) -> web.Response:
    items = "\n".join(f"<li>{html.escape(s)}</li>" for s in request.scopes)
    body = _template("consent.html").substitute(
        client_id=html.escape(request.client_id),
        company_name=html.escape(state.settings.company_name),
        scope_items=items,
        request_id=html.escape(request_id),
    )
    return web.Response(text=body, content_type="text/html", headers=NO_STORE)


def redirect_back(redirect_uri: str, params: Mapping[str, str]) -> web.Response:
    """302 to the (already verified) redirect URI with params added to its query."""
    location = URL(redirect_uri).update_query(dict(params))
    return web.Response(status=302, headers={"Location": str(location), **NO_STORE})


# -- authorise ------------------------------------------------------------------------


async def authorize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    query = request.query
    # Until client and redirect URI are known good, errors stay on our page:
    # redirecting to an unverified URI would make us an open redirector (RFC 6749 §4.1.2.1).
    if query.get("client_id") != state.settings.client_id:
        return error_page("Unknown client_id.")
    redirect_uri = query.get("redirect_uri", "")
    if redirect_uri not in state.knobs.redirect_uris:
        return error_page("The redirect_uri is not registered for this client.")
    problem = _authorize_problem(query, state.settings.allowed_scopes)
    if problem is not None:
        error, description = problem
        params = {"error": error, "error_description": description}
        if "state" in query:
            params["state"] = query["state"]
        return redirect_back(redirect_uri, params)
    auth_request = AuthRequest(
        client_id=query["client_id"],
        redirect_uri=redirect_uri,
        scopes=tuple(query["scope"].split()),
        state=query["state"],
        code_challenge=query["code_challenge"],
    )
    if state.knobs.auto_approve:
        return _approve(state, auth_request)
    return consent_page(state, auth_request, state.park_request(auth_request))


def _authorize_problem(
    query: MultiMapping[str], allowed_scopes: tuple[str, ...]
) -> tuple[str, str] | None:
    """The first thing wrong with a request whose client and redirect URI are valid."""
    for name in AUTHORIZE_PARAMS:
        if len(query.getall(name, [])) > 1:
            return "invalid_request", f"{name} given more than once"
    if query.get("response_type") != "code":
        return "unsupported_response_type", "only response_type=code is supported"
    if not query.get("state"):
        return "invalid_request", "state is required"
    if query.get("code_challenge_method") != "S256":
        return "invalid_request", "PKCE with code_challenge_method=S256 is required"
    if CHALLENGE_RE.fullmatch(query.get("code_challenge", "")) is None:
        return "invalid_request", "code_challenge is missing or malformed"
    scopes = query.get("scope", "").split()
    if not scopes or any(s not in allowed_scopes for s in scopes):
        return "invalid_scope", "scope is empty or not allowed for this client"
    return None


async def decide(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    form = await request.post()
    request_id = form.get("request_id")
    decision = form.get("decision")
    if not isinstance(request_id, str) or decision not in ("approve", "deny"):
        return error_page("Malformed consent decision.")
    auth_request = state.take_request(request_id)
    if auth_request is None:
        return error_page("This authorisation request is unknown, expired or already decided.")
    if decision == "deny":
        params = {"error": "access_denied", "state": auth_request.state}
        return redirect_back(auth_request.redirect_uri, params)
    return _approve(state, auth_request)


def _approve(state: SandboxState, auth_request: AuthRequest) -> web.Response:
    code = state.issue_code(auth_request)
    return redirect_back(auth_request.redirect_uri, {"code": code, "state": auth_request.state})


# -- token endpoint -------------------------------------------------------------------


def token_error(error: str, description: str, *, status: int = 400) -> web.Response:
    headers = dict(NO_STORE)
    if error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="sandbox"'  # RFC 6749 §5.2
    body = {"error": error, "error_description": description}
    return web.json_response(body, status=status, headers=headers)


async def token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.stats.token_requests += 1
    state.token_in_flight += 1
    state.stats.token_in_flight_max = max(state.stats.token_in_flight_max, state.token_in_flight)
    try:
        return await _token(request, state)
    finally:
        state.token_in_flight -= 1


async def _token(request: web.Request, state: SandboxState) -> web.StreamResponse:
    # Read first, then slow: like a real server, the sandbox completes a request it has
    # received even if the client has gone meanwhile (its rotated tokens are then lost).
    form = await request.post() if request.content_type == FORM_TYPE else None
    await state.pause(state.knobs.latency + state.knobs.token_latency)
    failure = state.take_token_failure()
    if failure is not None:
        return await _fail(request, state, failure)
    if form is None:
        return token_error("invalid_request", f"the body must be {FORM_TYPE}")
    client_id = _authenticate(request, form, state)
    if client_id is None:
        return token_error("invalid_client", "client authentication failed", status=401)
    try:
        issued = _grant(form, state, client_id)
    except TokenError as exc:
        return token_error(exc.error, exc.description)
    omit_refresh = state.take_refresh_token_omission()
    return web.json_response(_token_body(issued, omit_refresh=omit_refresh), headers=NO_STORE)


def _authenticate(
    request: web.Request, form: MultiDictProxy[Any], state: SandboxState
) -> str | None:
    """The client id if HTTP Basic authenticates it; Pleo accepts client_secret_basic only."""
    if "client_secret" in form:
        return None  # client_secret_post, alone or mixed with Basic (RFC 6749 §2.3)
    creds = _basic_credentials(request.headers.get("Authorization", ""))
    if creds is None:
        return None
    client_id, secret = creds
    if form.get("client_id", client_id) != client_id:
        return None
    settings = state.settings
    id_ok = hmac.compare_digest(client_id.encode(), settings.client_id.encode())
    secret_ok = hmac.compare_digest(secret.encode(), settings.client_secret.encode())
    return client_id if id_ok and secret_ok else None


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(client_id, secret) from an HTTP Basic header, or None if it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, colon, password = decoded.partition(":")
    if not colon:
        return None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before the Basic encoding.
    return unquote_plus(login), unquote_plus(password)


def _grant(form: MultiDictProxy[Any], state: SandboxState, client_id: str) -> IssuedTokens:
    grant_type = form.get("grant_type")
    if grant_type == "authorization_code":
        code, redirect_uri, verifier = _required(form, "code", "redirect_uri", "code_verifier")
        return state.exchange_code(
            code, client_id=client_id, redirect_uri=redirect_uri, verifier=verifier
        )
    if grant_type == "refresh_token":
        (refresh_token,) = _required(form, "refresh_token")
        return state.refresh(refresh_token, client_id=client_id)
    if grant_type is None:
        raise TokenError("invalid_request", "grant_type is required")
    raise TokenError("unsupported_grant_type", "only authorization_code and refresh_token")


def _required(form: MultiDictProxy[Any], *names: str) -> list[str]:
    values = []
    for name in names:
        value = form.get(name)
        if not isinstance(value, str) or not value:
            raise TokenError("invalid_request", f"{name} is required")
        values.append(value)
    return values


def _token_body(issued: IssuedTokens, *, omit_refresh: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": " ".join(issued.scopes),
    }
    if not omit_refresh:
        body["refresh_token"] = issued.refresh_token
    return body


async def _fail(request: web.Request, state: SandboxState, mode: str) -> web.StreamResponse:
    """Answer the way a broken token endpoint would (the "token_failure_mode" knob)."""
    if mode == "reset":
        _reset_connection(request)
        # Writing this to the aborted transport fails quietly inside aiohttp.
        return web.Response(status=500)
    if mode == "timeout":
        await state.pause(60.0)
        return token_error("temporarily_unavailable", "timed out", status=503)
    if mode == "garbage":
        return web.Response(text="<html>Bad gateway</html>", content_type="text/html")
    if mode == "429":
        headers = {"Retry-After": "1"}
        body = {"error": "rate_limited", "error_description": "too many requests"}
        return web.json_response(body, status=429, headers=headers)
    error = "temporarily_unavailable" if mode == "503" else "server_error"
    return token_error(error, "the sandbox was told to fail", status=int(mode))


def _reset_connection(request: web.Request) -> None:
    """Close with a TCP RST: SO_LINGER with a zero timeout discards the send buffer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
