"""The OAuth wire protocol against real loopback servers: a token-endpoint stand-in, dead ports."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import parse_qs, parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Pleo
from proxy.connect import pkce
from proxy.errors import (
    ClientRejected,
    ConfigError,
    OAuthError,
    ReauthorizationRequired,
    TransientOAuthError,
)
from proxy.lifecycle import oauth
from proxy.sandbox import RunningSandbox, SandboxSettings, start_sandbox
from proxy.sandbox.state import DEFAULT_COMPANY_ID
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from tests.sandboxes import set_knobs

NOW = 1_700_000_000.0
CLIENT_ID = "client:id%1"  # ':' and '%' prove the RFC 6749 §2.3.1 form-encoding
CLIENT_SECRET = "s3cr:et%2B+/ x"
REFRESH = "rt-SECRET-refresh-value"
CODE = "code-SECRET-value"
ACCESS = "at-SECRET-access-value"
SECRETS = (CLIENT_SECRET, REFRESH, CODE, ACCESS)

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]


async def _token_ok(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"access_token": ACCESS, "refresh_token": "rt-new", "expires_in": 3600,
         "token_type": "Bearer", "scope": "a:read b:write"}
    )  # fmt: skip


@dataclass
class StandIn:
    """A token endpoint / API stand-in answering whatever `reply` says; records requests."""

    url: str = ""
    reply: Reply = _token_ok
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.method, request.path, headers, parse_qsl(body)))
        return await self.reply(request)


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    recorder = StandIn()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recorder.url = str(server.make_url("")).rstrip("/")
    try:
        yield recorder
    finally:
        recorder.release.set()
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def make_pleo(base: str, **changes: object) -> Pleo:
    pleo = Pleo(
        environment="sandbox",
        api_url=base,
        authorize_url=f"{base}/oauth/authorize",
        token_url=f"{base}/oauth/token",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        scopes=("a:read", "b:write"),
        redirect_uri="http://localhost:8080/_proxy/callback",
    )
    return replace(pleo, **changes)  # type: ignore[arg-type]


def json_reply(status: int, doc: object, headers: dict[str, str] | None = None) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(doc, status=status, headers=headers)

    return reply


def raw_reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    return reply


async def do_refresh(session: aiohttp.ClientSession, pleo: Pleo, timeout: float = 5) -> TokenSet:
    return await oauth.refresh_tokens(
        session, pleo, refresh_token=Secret(REFRESH), timeout=timeout, now=NOW
    )


async def do_exchange(session: aiohttp.ClientSession, pleo: Pleo) -> TokenSet:
    return await oauth.exchange_code(
        session, pleo, code=Secret(CODE), code_verifier="v" * 43, timeout=5, now=NOW
    )


# --- the authorise URL ----------------------------------------------------------------------


def test_authorize_url_carries_every_parameter_once() -> None:
    pleo = make_pleo("https://auth.example")
    url = oauth.build_authorize_url(pleo, state="st&=ate", code_challenge="ch-al_lenge")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.example", "/oauth/authorize")
    assert "+" not in parts.query  # spaces are %20, so no decoder can take '+' literally
    assert parse_qs(parts.query, strict_parsing=True) == {
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": ["http://localhost:8080/_proxy/callback"],
        "scope": ["a:read b:write"],
        "state": ["st&=ate"],
        "code_challenge": ["ch-al_lenge"],
        "code_challenge_method": ["S256"],
    }


def test_authorize_url_keeps_a_configured_query_but_not_our_parameters() -> None:
    pleo = make_pleo("x", authorize_url="https://auth.example/authorize?tenant=a%20b&scope=old#f")
    url = oauth.build_authorize_url(pleo, state="s", code_challenge="c")
    parts = urlsplit(url)
    assert parts.query.startswith("tenant=a%20b&")  # kept verbatim, ahead of ours
    params = parse_qs(parts.query)
    assert params["tenant"] == ["a b"]
    assert params["scope"] == ["a:read b:write"]
    assert parts.fragment == ""


def test_authorize_url_needs_a_client_id() -> None:
    with pytest.raises(ConfigError) as caught:
        oauth.build_authorize_url(make_pleo("x", client_id=None), state="s", code_challenge="c")
    assert caught.value.problems[0].path == "pleo.client_id"


# --- requests on the wire -------------------------------------------------------------------


def basic_credentials(seen: Seen) -> str:
    scheme, _, value = seen.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(value, validate=True).decode()


async def test_refresh_sends_basic_auth_and_only_the_grant(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    await do_refresh(session, make_pleo(stand_in.url))
    [seen] = stand_in.seen
    assert (seen.method, seen.path) == ("POST", "/oauth/token")
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert basic_credentials(seen) == "client%3Aid%251:s3cr%3Aet%252B%2B%2F+x"
    assert seen.form == [("grant_type", "refresh_token"), ("refresh_token", REFRESH)]


async def test_exchange_sends_code_verifier_and_redirect_uri(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    await do_exchange(session, make_pleo(stand_in.url))
    [seen] = stand_in.seen
    assert basic_credentials(seen) == "client%3Aid%251:s3cr%3Aet%252B%2B%2F+x"
    assert dict(seen.form) == {
        "grant_type": "authorization_code",
        "code": CODE,
        "redirect_uri": "http://localhost:8080/_proxy/callback",
        "code_verifier": "v" * 43,
    }
    assert len(seen.form) == 4


@pytest.mark.parametrize("grant", ["refresh", "exchange"])
async def test_client_secret_post_puts_credentials_in_the_body_only(
    stand_in: StandIn, session: aiohttp.ClientSession, grant: str
) -> None:
    pleo = make_pleo(stand_in.url, token_auth_method="client_secret_post")
    await (do_refresh(session, pleo) if grant == "refresh" else do_exchange(session, pleo))
    [seen] = stand_in.seen
    assert "authorization" not in seen.headers
    form = dict(seen.form)
    assert (form["client_id"], form["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert len(seen.form) == len(form)  # no field twice


async def test_public_client_sends_only_its_id(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    await do_refresh(session, make_pleo(stand_in.url, client_secret=None))
    [seen] = stand_in.seen
    assert "authorization" not in seen.headers
    assert dict(seen.form)["client_id"] == CLIENT_ID
    assert "client_secret" not in dict(seen.form)


async def test_refresh_parses_the_answer(stand_in: StandIn, session: aiohttp.ClientSession) -> None:
    tokens = await do_refresh(session, make_pleo(stand_in.url))
    assert tokens.access_token == Secret(ACCESS)
    assert tokens.refresh_token == Secret("rt-new")
    assert (tokens.expires_at, tokens.lifetime) == (NOW + 3600, 3600)
    assert tokens.scopes == ("a:read", "b:write")


async def test_refresh_without_new_refresh_token_keeps_the_presented_one(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = json_reply(200, {"access_token": ACCESS, "expires_in": 60})
    tokens = await do_refresh(session, make_pleo(stand_in.url))
    assert tokens.refresh_token == Secret(REFRESH)
    assert tokens.scopes == ("a:read", "b:write")  # requested scopes: none were returned


async def test_redirects_are_not_followed(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = raw_reply(307, b"", {"Location": f"{stand_in.url}/elsewhere"})
    with pytest.raises(TransientOAuthError):
        await do_refresh(session, make_pleo(stand_in.url))
    assert [s.path for s in stand_in.seen] == ["/oauth/token"]


# --- parsing --------------------------------------------------------------------------------


def test_parse_numeric_string_expires_in_and_case_insensitive_bearer() -> None:
    doc = {"access_token": "a", "expires_in": "120.5", "token_type": "bearer", "scope": " x  y "}
    tokens = oauth.parse_token_response(doc, now=NOW)
    assert (tokens.expires_at, tokens.lifetime, tokens.token_type) == (NOW + 120.5, 120.5, "Bearer")
    assert tokens.scopes == ("x", "y")


def test_parse_missing_expires_in_assumes_fifteen_minutes() -> None:
    tokens = oauth.parse_token_response({"access_token": "a"}, now=NOW)
    assert tokens.lifetime == 900
    assert tokens.refresh_token is None


def test_parse_missing_refresh_token_keeps_the_previous_one() -> None:
    previous = Secret("old")
    doc = {"access_token": "a", "expires_in": 5, "refresh_token": None}
    assert oauth.parse_token_response(doc, now=NOW, previous_refresh=previous).refresh_token == (
        previous
    )


def test_parse_missing_scope_falls_back_to_requested() -> None:
    doc = {"access_token": "a", "expires_in": 5, "scope": ""}
    tokens = oauth.parse_token_response(doc, now=NOW, requested_scopes=("r:1",))
    assert tokens.scopes == ("r:1",)


@pytest.mark.parametrize("token_type", ["mac", "DPoP", 1])
def test_parse_rejects_a_token_type_other_than_bearer(token_type: object) -> None:
    with pytest.raises(ClientRejected):
        oauth.parse_token_response({"access_token": "a", "token_type": token_type}, now=NOW)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "token",
        {},
        {"access_token": ""},
        {"access_token": 5},
        {"access_token": "a", "expires_in": "soon"},
        {"access_token": "a", "expires_in": 0},
        {"access_token": "a", "expires_in": -5},
        {"access_token": "a", "expires_in": float("nan")},
        {"access_token": "a", "expires_in": True},
        {"access_token": "a", "refresh_token": 7},
    ],
)
def test_parse_garbage_is_transient(doc: object) -> None:
    with pytest.raises(TransientOAuthError, match="200 without a usable token"):
        oauth.parse_token_response(doc, now=NOW)


# --- error classification, over HTTP --------------------------------------------------------

RR, CR, TR = ReauthorizationRequired, ClientRejected, TransientOAuthError
REFUSED = "Pleo refused the refresh token ({})"
GONE = REFUSED.format("invalid_refresh_token")
IN_90_S = format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True)
CLASSIFICATION = [
    # status, body, headers, expected type, retry_after, text expected in the detail
    (400, {"error": "invalid_grant"}, {}, RR, None, REFUSED.format("invalid_grant")),
    (400, {"error": "invalid_token"}, {}, RR, None, REFUSED.format("invalid_token")),
    (400, {"error": "invalid_refresh_token"}, {}, RR, None, GONE),
    (400, {"error": "invalid_request", "error_description": GONE}, {}, RR, None, GONE),
    (400, b"invalid_refresh_token", {}, RR, None, GONE),
    (401, {"error": "invalid_client"}, {}, CR, None, "invalid_client, HTTP 401"),
    (400, {"error": "unauthorized_client"}, {}, CR, None, "unauthorized_client"),
    (401, b"Unauthorized", {}, CR, None, "HTTP 401"),
    (400, {"error": "invalid_request"}, {}, CR, None, "invalid_request, HTTP 400"),
    (400, {"error": "unsupported_grant_type"}, {}, CR, None, "unsupported_grant_type"),
    (400, {"error": "invalid_scope"}, {}, CR, None, "invalid_scope"),
    (400, b"<html>bad</html>", {}, CR, None, "HTTP 400"),
    (500, b"oops", {}, TR, None, "unavailable (HTTP 500)"),
    (503, b"", {"Retry-After": "7"}, TR, 7.0, "HTTP 503"),
    (502, {"error": "invalid_grant"}, {}, TR, None, "invalid_grant, HTTP 502"),
    (429, {"error": "slow_down"}, {"Retry-After": "30"}, TR, 30.0, "slow_down, HTTP 429"),
    (429, b"", {"Retry-After": IN_90_S}, TR, 90.0, "HTTP 429"),
    (429, b"", {"Retry-After": "whenever"}, TR, None, "HTTP 429"),
    (408, b"", {}, TR, None, "unavailable (HTTP 408)"),
    (302, b"", {"Location": "/x"}, TR, None, "unexpectedly (HTTP 302)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "retry_after", "detail"), CLASSIFICATION
)
async def test_token_endpoint_errors_are_classified(
    stand_in: StandIn,
    session: aiohttp.ClientSession,
    status: int,
    body: object,
    headers: dict[str, str],
    kind: type[OAuthError],
    retry_after: float | None,
    detail: str,
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stand_in.reply = raw_reply(status, raw, headers)
    with pytest.raises(OAuthError) as caught:
        await do_refresh(session, make_pleo(stand_in.url))
    assert type(caught.value) is kind
    assert detail in caught.value.detail
    if isinstance(caught.value, TransientOAuthError):
        assert caught.value.retry_after == pytest.approx(retry_after, abs=1.0)


async def test_exchange_refused_names_the_code_not_a_refresh_token(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = json_reply(400, {"error": "invalid_grant"})
    with pytest.raises(ReauthorizationRequired) as caught:
        await do_exchange(session, make_pleo(stand_in.url))
    assert caught.value.detail == "Pleo refused the authorisation code (invalid_grant)"


@pytest.mark.parametrize("body", [b"<html>login</html>", b'{"token_type": "Bearer"}', b"[1]"])
async def test_garbage_200_is_transient(
    stand_in: StandIn, session: aiohttp.ClientSession, body: bytes
) -> None:
    stand_in.reply = raw_reply(200, body, {"Content-Type": "application/json"})
    with pytest.raises(TransientOAuthError, match="200 without a usable token"):
        await do_refresh(session, make_pleo(stand_in.url))


async def test_oversized_answer_is_transient(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = raw_reply(200, b" " * (oauth.MAX_RESPONSE_BYTES + 1))
    with pytest.raises(TransientOAuthError, match="size limit"):
        await do_refresh(session, make_pleo(stand_in.url))


def test_unrecognisable_error_code_is_not_echoed() -> None:
    error = oauth.classify_error(400, b'{"error": "Bad Thing!"}', retry_after=None)
    assert isinstance(error, ClientRejected)
    assert "Bad Thing" not in error.detail
    assert oauth.error_code(b'{"error": "' + b"a" * 65 + b'"}') is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), (" 12 ", 12.0), ("-3", None), ("1.5", None), ("", None), (None, None),
     ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0)],
)  # fmt: skip
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert oauth.parse_retry_after(value, now=NOW) == expected


def test_retry_after_date_needs_now() -> None:
    assert oauth.parse_retry_after("Thu, 01 Jan 2099 00:00:00 GMT") is None


# --- transport failures ---------------------------------------------------------------------


async def test_timeout_is_transient(stand_in: StandIn, session: aiohttp.ClientSession) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(stand_in.release.wait(), timeout=10)
        return web.Response()

    stand_in.reply = stall
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransientOAuthError, match="timed out"):
        await do_refresh(session, make_pleo(stand_in.url), timeout=0.3)
    assert loop.time() - started < 3


async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Read the request, then hang up without answering (with an RST if `reset`)."""
    await reader.readuntil(b"\r\n\r\n")
    if reset:  # SO_LINGER 0: close() sends RST instead of FIN
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


@pytest.fixture(params=[False, True], ids=["closed", "reset"])
async def dropping_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    reset: bool = request.param
    server = await asyncio.start_server(lambda r, w: drop(r, w, reset=reset), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_dropped_connection_is_transient(
    dropping_url: str, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(TransientOAuthError, match="unreachable"):
        await do_refresh(session, make_pleo(dropping_url))


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connection_is_transient(session: aiohttp.ClientSession) -> None:
    with pytest.raises(TransientOAuthError, match="unreachable"):
        await do_refresh(session, make_pleo(f"http://127.0.0.1:{dead_port()}"))


# --- secrets never in messages --------------------------------------------------------------


async def echo_everything(request: web.Request) -> web.StreamResponse:
    """A hostile endpoint that echoes every credential it received into its answer."""
    echo = (await request.text()) + " " + request.headers.get("Authorization", "")
    status = int(request.query.get("status", "400"))
    doc = {"error": request.query.get("error", "invalid_grant"), "error_description": echo}
    return web.json_response(doc, status=status, headers={"Retry-After": echo[:50]})


def assert_no_secret(error: BaseException) -> None:
    texts = [str(error), repr(error)]
    if isinstance(error, OAuthError):
        texts.append(json.dumps(error.body()))
    basic = oauth.basic_authorization(CLIENT_ID, Secret(CLIENT_SECRET)).reveal()
    for text in texts:
        for secret in (*SECRETS, basic, basic.split()[1]):
            assert secret not in text


@pytest.mark.parametrize("status", [400, 401, 429, 500])
@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client", "invalid_request", REFRESH])
@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("grant", ["refresh", "exchange"])
async def test_error_messages_hold_no_secret(
    stand_in: StandIn,
    session: aiohttp.ClientSession,
    status: int,
    error: str,
    method: str,
    grant: str,
) -> None:
    stand_in.reply = echo_everything
    pleo = make_pleo(stand_in.url, token_auth_method=method)
    pleo = replace(pleo, token_url=f"{pleo.token_url}?status={status}&error={error}")
    with pytest.raises(OAuthError) as caught:
        await (do_refresh(session, pleo) if grant == "refresh" else do_exchange(session, pleo))
    assert_no_secret(caught.value)


async def test_garbage_and_transport_messages_hold_no_secret(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = raw_reply(200, f"<html>{REFRESH} {CODE} {ACCESS}".encode())
    failures: list[BaseException] = []
    for pleo in (make_pleo(stand_in.url), make_pleo(f"http://127.0.0.1:{dead_port()}")):
        with pytest.raises(OAuthError) as caught:
            await do_refresh(session, pleo)
        failures.append(caught.value)
    bad_type = {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": ACCESS}
    with pytest.raises(ClientRejected) as rejected:
        oauth.parse_token_response(bad_type, now=NOW)
    for failure in [*failures, rejected.value]:
        assert_no_secret(failure)


# --- introspection --------------------------------------------------------------------------

INTROSPECTION = {
    "data": {
        "authMethod": "OAUTH",
        "clientId": "c",
        "scope": "a:read b:write",
        "applicationName": "My App",
        "subjectURN": "urn:pleo:company:123",
        "companyName": "ACME",
    }
}


async def test_introspect_reads_who_the_token_acts_for(
    stand_in: StandIn, session: aiohttp.ClientSession
) -> None:
    stand_in.reply = json_reply(200, INTROSPECTION)
    subject = await oauth.introspect(
        session, make_pleo(stand_in.url + "/"), authorization=Secret(f"Bearer {ACCESS}"), timeout=5
    )
    assert subject == oauth.Subject("urn:pleo:company:123", "ACME", ("a:read", "b:write"), "My App")
    [seen] = stand_in.seen
    assert (seen.method, seen.path) == ("GET", "/v1/introspect")
    assert seen.headers["authorization"] == f"Bearer {ACCESS}"


@pytest.mark.parametrize(
    "reply", [json_reply(401, {"error": "x"}), raw_reply(200, b"nope"), json_reply(200, [1])]
)
async def test_introspect_failures_are_transient(
    stand_in: StandIn, session: aiohttp.ClientSession, reply: Reply
) -> None:
    stand_in.reply = reply
    with pytest.raises(TransientOAuthError) as caught:
        await oauth.introspect(
            session, make_pleo(stand_in.url), authorization=Secret(ACCESS), timeout=5
        )
    assert_no_secret(caught.value)


async def test_introspect_unreachable_is_transient(session: aiohttp.ClientSession) -> None:
    pleo = make_pleo(f"http://127.0.0.1:{dead_port()}")
    with pytest.raises(TransientOAuthError, match="introspection unreachable"):
        await oauth.introspect(session, pleo, authorization=Secret(ACCESS), timeout=5)


def test_introspection_tolerates_missing_fields() -> None:
    assert oauth.parse_introspection({"data": {"subjectURN": 5}}) == oauth.Subject(
        None, None, (), None
    )


# --- against the bundled sandbox ------------------------------------------------------------

SANDBOX_ID, SANDBOX_SECRET = "sand:box%id", "sand:box%+secret"  # the encoding must agree
REDIRECT = "http://localhost:8080/_proxy/callback"


@pytest.fixture
async def flow_sandbox() -> AsyncIterator[RunningSandbox]:
    settings = SandboxSettings(
        client_id=SANDBOX_ID,
        client_secret=SANDBOX_SECRET,
        redirect_uris=(REDIRECT,),
        auto_approve=True,
    )
    running = await start_sandbox(settings)
    try:
        yield running
    finally:
        await running.close()


def sandbox_pleo(url: str) -> Pleo:
    pleo = make_pleo(url, client_id=SANDBOX_ID, client_secret=Secret(SANDBOX_SECRET))
    return replace(pleo, scopes=("users:read", "test:test"))


async def authorise(session: aiohttp.ClientSession, pleo: Pleo) -> tuple[Secret, str]:
    """Follow the auto-approved authorise URL one hop: (code, verifier)."""
    verifier = pkce.new_verifier()
    url = oauth.build_authorize_url(
        pleo, state="st-1", code_challenge=pkce.challenge_s256(verifier)
    )
    async with session.get(url, allow_redirects=False) as response:
        assert response.status == 302
        location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    params = parse_qs(location.query)
    assert params["state"] == ["st-1"]
    return Secret(params["code"][0]), verifier


async def test_sandbox_code_flow_refresh_rotation_and_reuse(
    flow_sandbox: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    pleo = sandbox_pleo(flow_sandbox.url)
    code, verifier = await authorise(session, pleo)
    first = await oauth.exchange_code(
        session, pleo, code=code, code_verifier=verifier, timeout=5, now=NOW
    )
    assert first.scopes == ("users:read", "test:test")
    assert first.refresh_token is not None
    subject = await oauth.introspect(
        session, pleo, authorization=Secret(f"Bearer {first.access_token.reveal()}"), timeout=5
    )
    assert subject.subject_urn == f"urn:pleo:company:{DEFAULT_COMPANY_ID}"
    assert subject.company_name == "Sandbox Company ApS"

    second = await oauth.refresh_tokens(
        session, pleo, refresh_token=first.refresh_token, timeout=5, now=NOW + 10
    )
    assert second.access_token != first.access_token
    assert second.refresh_token not in (None, first.refresh_token)
    assert second.expires_at == NOW + 10 + second.lifetime
    with pytest.raises(ReauthorizationRequired) as caught:
        await oauth.refresh_tokens(
            session, pleo, refresh_token=first.refresh_token, timeout=5, now=NOW + 20
        )
    assert caught.value.detail == "Pleo refused the refresh token (invalid_grant)"


async def test_sandbox_refuses_a_reused_code_and_a_wrong_verifier(
    flow_sandbox: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    pleo = sandbox_pleo(flow_sandbox.url)
    code, verifier = await authorise(session, pleo)
    await oauth.exchange_code(session, pleo, code=code, code_verifier=verifier, timeout=5, now=NOW)
    other_code, _ = await authorise(session, pleo)
    for used, presented in ((code, verifier), (other_code, pkce.new_verifier())):
        with pytest.raises(ReauthorizationRequired, match="authorisation code"):
            await oauth.exchange_code(
                session, pleo, code=used, code_verifier=presented, timeout=5, now=NOW
            )


def wrong_secret(pleo: Pleo) -> Pleo:
    return replace(pleo, client_secret=Secret("wrong"))


def secret_post(pleo: Pleo) -> Pleo:
    return replace(pleo, token_auth_method="client_secret_post")


@pytest.mark.parametrize("misconfigure", [wrong_secret, secret_post])
async def test_sandbox_rejects_the_client(
    flow_sandbox: RunningSandbox,
    session: aiohttp.ClientSession,
    misconfigure: Callable[[Pleo], Pleo],
) -> None:
    pleo = sandbox_pleo(flow_sandbox.url)
    code, verifier = await authorise(session, pleo)
    with pytest.raises(ClientRejected, match="invalid_client"):
        await oauth.exchange_code(
            session, misconfigure(pleo), code=code, code_verifier=verifier, timeout=5, now=NOW
        )


@pytest.mark.parametrize(
    ("mode", "retry_after"),
    [("500", None), ("503", None), ("429", 1.0), ("timeout", None), ("garbage", None),
     ("reset", None)],
)  # fmt: skip
async def test_sandbox_failure_modes_are_transient(
    flow_sandbox: RunningSandbox,
    session: aiohttp.ClientSession,
    mode: str,
    retry_after: float | None,
) -> None:
    pleo = sandbox_pleo(flow_sandbox.url)
    code, verifier = await authorise(session, pleo)
    tokens = await oauth.exchange_code(
        session, pleo, code=code, code_verifier=verifier, timeout=5, now=NOW
    )
    assert tokens.refresh_token is not None
    await set_knobs(flow_sandbox.url, token_failures=1, token_failure_mode=mode)
    with pytest.raises(TransientOAuthError) as caught:
        await oauth.refresh_tokens(
            session, pleo, refresh_token=tokens.refresh_token, timeout=0.5, now=NOW
        )
    assert caught.value.retry_after == retry_after
    # The failure consumed nothing: the same refresh token still works afterwards.
    await oauth.refresh_tokens(
        session, pleo, refresh_token=tokens.refresh_token, timeout=5, now=NOW
    )


async def test_sandbox_answer_without_refresh_token_keeps_the_old_one(
    flow_sandbox: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    pleo = sandbox_pleo(flow_sandbox.url)
    code, verifier = await authorise(session, pleo)
    tokens = await oauth.exchange_code(
        session, pleo, code=code, code_verifier=verifier, timeout=5, now=NOW
    )
    assert tokens.refresh_token is not None
    await set_knobs(flow_sandbox.url, token_failures=1, token_failure_mode="no_refresh_token")
    again = await oauth.refresh_tokens(
        session, pleo, refresh_token=tokens.refresh_token, timeout=5, now=NOW
    )
    assert again.refresh_token == tokens.refresh_token
    assert again.access_token != tokens.access_token
