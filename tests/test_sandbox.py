"""The bundled fake Pleo, driven over real HTTP the way a proxy and a browser would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.sandbox import SandboxSettings, serve_sandbox_forever, start_sandbox
from tests.sandboxes import (
    RunningSandbox,
    get_grants,
    get_stats,
    reset_stats,
    revoke_all,
    revoke_subject,
    sandbox,
    set_knobs,
)

__all__ = ["sandbox"]

REDIRECT_URI = SandboxSettings().redirect_uris[0]
BASIC = aiohttp.encode_basic_auth("sandbox-client", "sandbox-secret")
TIMEOUT = aiohttp.ClientTimeout(total=30)
CURSOR_RE = re.compile(r"^[A-Z2-7=~]+$")
SHARED_SUBJECT = f"urn:pleo:company:{SandboxSettings().company_id}"
SHARED_COMPANY = (SHARED_SUBJECT, SandboxSettings().company_name)
UUID4_SUBJECT_RE = re.compile(
    r"^urn:pleo:company:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
GRANT_FIELDS = {"id", "subject", "company_name", "revoked", "refreshes", "reuse_detected"}


def new_verifier() -> str:
    return secrets.token_urlsafe(48)


def challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_params(verifier: str, **overrides: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": "sandbox-client",
        "redirect_uri": REDIRECT_URI,
        "scope": "users:read test:test",
        "state": "st/ate with spaces&=?",
        "code_challenge": challenge(verifier),
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return params


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def consent_request_id(http: aiohttp.ClientSession, url: str, params: dict[str, str]) -> str:
    async with http.get(f"{url}/oauth/authorize", params=params, allow_redirects=False) as r:
        assert r.status == 200
        page = await r.text()
    assert 'action="/oauth/authorize/decision"' in page
    assert 'value="approve"' in page
    assert 'value="deny"' in page
    found = re.search(r'name="request_id" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


async def decide(http: aiohttp.ClientSession, url: str, request_id: str, decision: str) -> URL:
    form = {"request_id": request_id, "decision": decision}
    async with http.post(f"{url}/oauth/authorize/decision", data=form, allow_redirects=False) as r:
        assert r.status == 302
        return URL(r.headers["Location"])


async def approved_code(http: aiohttp.ClientSession, url: str, verifier: str, **kw: str) -> str:
    request_id = await consent_request_id(http, url, authorize_params(verifier, **kw))
    location = await decide(http, url, request_id, "approve")
    return location.query["code"]


async def token_call(
    http: aiohttp.ClientSession, url: str, form: dict[str, str], *, auth: str | None = BASIC
) -> tuple[int, Any]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with http.post(f"{url}/oauth/token", data=form, headers=headers) as r:
        return r.status, await r.json()


async def exchange(
    http: aiohttp.ClientSession, url: str, code: str, verifier: str
) -> tuple[int, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    return await token_call(http, url, form)


async def obtain_tokens(
    http: aiohttp.ClientSession, url: str, scope: str = "users:read test:test"
) -> dict[str, Any]:
    verifier = new_verifier()
    code = await approved_code(http, url, verifier, scope=scope)
    status, body = await exchange(http, url, code, verifier)
    assert status == 200
    return dict(body)


async def refresh(http: aiohttp.ClientSession, url: str, refresh_token: str) -> tuple[int, Any]:
    return await token_call(
        http, url, {"grant_type": "refresh_token", "refresh_token": refresh_token}
    )


async def api_get(http: aiohttp.ClientSession, url: str, path: str, token: str) -> tuple[int, Any]:
    async with http.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


# -- authorisation code flow ----------------------------------------------------------


async def test_full_code_flow_over_http(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    verifier = new_verifier()
    params = authorize_params(verifier)
    request_id = await consent_request_id(http, sandbox.url, params)
    location = await decide(http, sandbox.url, request_id, "approve")
    assert str(location.with_query(None)) == REDIRECT_URI
    assert location.query["state"] == params["state"]
    status, tokens = await exchange(http, sandbox.url, location.query["code"], verifier)
    assert status == 200
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 900
    assert tokens["scope"] == "users:read test:test"
    assert tokens["access_token"] != tokens["refresh_token"]
    status, info = await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"])
    assert status == 200
    assert info["data"]["authMethod"] == "OAUTH"
    assert info["data"]["clientId"] == "sandbox-client"
    assert info["data"]["scope"] == "users:read test:test"
    assert (info["data"]["subjectURN"], info["data"]["companyName"]) == SHARED_COMPANY
    stats = await get_stats(sandbox.url)
    assert (stats["code_grants"], stats["active_grants"], stats["token_requests"]) == (1, 1, 1)


async def test_deny_redirects_with_access_denied(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    params = authorize_params(new_verifier(), state="xyz")
    request_id = await consent_request_id(http, sandbox.url, params)
    location = await decide(http, sandbox.url, request_id, "deny")
    assert dict(location.query) == {"error": "access_denied", "state": "xyz"}


async def test_a_consent_decision_counts_once(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    request_id = await consent_request_id(http, sandbox.url, authorize_params(new_verifier()))
    await decide(http, sandbox.url, request_id, "approve")
    form = {"request_id": request_id, "decision": "approve"}
    async with http.post(f"{sandbox.url}/oauth/authorize/decision", data=form) as r:
        assert r.status == 400


@pytest.mark.parametrize(
    "override",
    [{"client_id": "someone-else"}, {"redirect_uri": "http://localhost:8080/elsewhere"}],
)
async def test_unknown_client_or_redirect_uri_gets_a_page_not_a_redirect(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, override: dict[str, str]
) -> None:
    params = authorize_params(new_verifier(), **override)
    async with http.get(
        f"{sandbox.url}/oauth/authorize", params=params, allow_redirects=False
    ) as r:
        assert r.status == 400
        assert "Location" not in r.headers
        assert r.content_type == "text/html"


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"scope": "users:read admin:everything"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
)
async def test_bad_authorize_requests_redirect_with_an_error(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, override: dict[str, str], error: str
) -> None:
    params = authorize_params(new_verifier(), state="s1", **override)
    async with http.get(
        f"{sandbox.url}/oauth/authorize", params=params, allow_redirects=False
    ) as r:
        assert r.status == 302
        location = URL(r.headers["Location"])
    assert location.query["error"] == error
    assert location.query["state"] == "s1"
    assert "code" not in location.query


async def test_auto_approve_knob_redirects_straight_back(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, auto_approve=True)
    verifier = new_verifier()
    params = authorize_params(verifier)
    async with http.get(
        f"{sandbox.url}/oauth/authorize", params=params, allow_redirects=False
    ) as r:
        assert r.status == 302
        location = URL(r.headers["Location"])
    assert location.query["state"] == params["state"]
    status, _ = await exchange(http, sandbox.url, location.query["code"], verifier)
    assert status == 200


async def test_pkce_mismatch_is_invalid_grant(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    code = await approved_code(http, sandbox.url, new_verifier())
    status, body = await exchange(http, sandbox.url, code, new_verifier())
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_redirect_uri_must_match_the_authorize_request(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    other = "http://localhost:9999/_proxy/callback"
    await set_knobs(sandbox.url, redirect_uris=[REDIRECT_URI, other])
    verifier = new_verifier()
    code = await approved_code(http, sandbox.url, verifier, redirect_uri=other)
    status, body = await exchange(http, sandbox.url, code, verifier)  # sends REDIRECT_URI
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_reused_code_is_refused_and_revokes_its_tokens(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    verifier = new_verifier()
    code = await approved_code(http, sandbox.url, verifier)
    status, tokens = await exchange(http, sandbox.url, code, verifier)
    assert status == 200
    status, body = await exchange(http, sandbox.url, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, _ = await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"])
    assert status == 401
    status, body = await refresh(http, sandbox.url, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_expired_code_is_invalid_grant(http: aiohttp.ClientSession) -> None:
    running = await start_sandbox(SandboxSettings(code_ttl=0.2))
    try:
        verifier = new_verifier()
        code = await approved_code(http, running.url, verifier)
        await asyncio.sleep(0.3)
        status, body = await exchange(http, running.url, code, verifier)
        assert (status, body["error"]) == (400, "invalid_grant")
    finally:
        await running.close()


# -- client authentication and grant types --------------------------------------------


async def test_client_secret_post_is_refused(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    verifier = new_verifier()
    code = await approved_code(http, sandbox.url, verifier)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": "sandbox-client",
        "client_secret": "sandbox-secret",
    }
    status, body = await token_call(http, sandbox.url, form, auth=None)
    assert (status, body["error"]) == (401, "invalid_client")
    status, body = await token_call(http, sandbox.url, form)  # Basic and body at once
    assert (status, body["error"]) == (401, "invalid_client")
    assert (await get_stats(sandbox.url))["code_grants"] == 0


async def test_wrong_client_secret_is_invalid_client(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    form = {"grant_type": "refresh_token", "refresh_token": "x"}
    wrong = aiohttp.encode_basic_auth("sandbox-client", "guess")
    async with http.post(
        f"{sandbox.url}/oauth/token", data=form, headers={"Authorization": wrong}
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert (await r.json())["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("form", "error"),
    [({"grant_type": "password"}, "unsupported_grant_type"), ({}, "invalid_request")],
)
async def test_grant_type_errors(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, form: dict[str, str], error: str
) -> None:
    status, body = await token_call(http, sandbox.url, {"scope": "x", **form})
    assert (status, body["error"]) == (400, error)


# -- rotation, reuse, expiry, revocation ----------------------------------------------


async def test_refresh_rotates_both_tokens(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    old = await obtain_tokens(http, sandbox.url)
    status, new = await refresh(http, sandbox.url, old["refresh_token"])
    assert status == 200
    assert new["refresh_token"] != old["refresh_token"]
    assert (await api_get(http, sandbox.url, "/v1/introspect", old["access_token"]))[0] == 401
    assert (await api_get(http, sandbox.url, "/v1/introspect", new["access_token"]))[0] == 200
    status, _ = await refresh(http, sandbox.url, new["refresh_token"])
    assert status == 200
    stats = await get_stats(sandbox.url)
    assert (stats["refresh_grants"], stats["reuse_detected"]) == (2, 0)


async def test_reusing_a_refresh_token_revokes_the_whole_grant(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    old = await obtain_tokens(http, sandbox.url)
    _, new = await refresh(http, sandbox.url, old["refresh_token"])
    status, body = await refresh(http, sandbox.url, old["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await api_get(http, sandbox.url, "/v1/introspect", new["access_token"]))[0] == 401
    status, body = await refresh(http, sandbox.url, new["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    stats = await get_stats(sandbox.url)
    assert (stats["reuse_detected"], stats["active_grants"]) == (1, 0)


async def test_expired_access_token_is_401(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, access_ttl=1)
    tokens = await obtain_tokens(http, sandbox.url)
    assert tokens["expires_in"] == 1
    await asyncio.sleep(1.2)
    status, body = await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"])
    assert (status, body["type"]) == (401, "unauthorized")


async def test_expired_tokens_are_counted_apart_from_unknown_ones(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    ahead = 0.0
    sandbox.state.clock = lambda: time.monotonic() + ahead  # the sandbox's time, shiftable
    tokens = await obtain_tokens(http, sandbox.url)
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 200
    assert (await api_get(http, sandbox.url, "/v1/introspect", "sbx_at_unknown"))[0] == 401
    assert (await get_stats(sandbox.url))["expired_tokens"] == 0
    ahead = tokens["expires_in"] + 1.0
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 401
    assert (await get_stats(sandbox.url))["expired_tokens"] == 1


async def test_revoke_knob_ends_every_grant(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    tokens = await obtain_tokens(http, sandbox.url)
    await revoke_all(sandbox.url)
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 401
    status, body = await refresh(http, sandbox.url, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    stats = await get_stats(sandbox.url)
    # A revoked grant's current refresh token is not a replay.
    assert (stats["active_grants"], stats["reuse_detected"]) == (0, 0)


# -- companies, per-subject revocation, the grant list --------------------------------


async def introspect(http: aiohttp.ClientSession, url: str, token: str) -> tuple[str, str]:
    """(subjectURN, companyName) the API reports for this access token."""
    status, body = await api_get(http, url, "/v1/introspect", token)
    assert status == 200
    return body["data"]["subjectURN"], body["data"]["companyName"]


async def test_grants_share_the_settings_company_by_default(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert (await set_knobs(sandbox.url))["distinct_companies"] is False
    first, second = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    assert await introspect(http, sandbox.url, first["access_token"]) == SHARED_COMPANY
    assert await introspect(http, sandbox.url, second["access_token"]) == SHARED_COMPANY
    companies = [(g["subject"], g["company_name"]) for g in await get_grants(sandbox.url)]
    assert companies == [SHARED_COMPANY, SHARED_COMPANY]


async def test_distinct_companies_gives_each_grant_its_own_company(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, distinct_companies=True)
    first, second = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    subject_1, name_1 = await introspect(http, sandbox.url, first["access_token"])
    subject_2, name_2 = await introspect(http, sandbox.url, second["access_token"])
    assert UUID4_SUBJECT_RE.match(subject_1)
    assert UUID4_SUBJECT_RE.match(subject_2)
    assert subject_1 != subject_2
    assert (name_1, name_2) == ("Sandbox Company 1", "Sandbox Company 2")
    # A refresh keeps the grant's company.
    _, renewed = await refresh(http, sandbox.url, first["refresh_token"])
    assert await introspect(http, sandbox.url, renewed["access_token"]) == (subject_1, name_1)
    companies = [(g["subject"], g["company_name"]) for g in await get_grants(sandbox.url)]
    assert companies == [(subject_1, name_1), (subject_2, name_2)]
    # Switched off again, new grants go back to the settings' company.
    await set_knobs(sandbox.url, distinct_companies=False)
    third = await obtain_tokens(http, sandbox.url)
    assert await introspect(http, sandbox.url, third["access_token"]) == SHARED_COMPANY


async def test_revoking_one_subject_leaves_the_other_grants_alive(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, distinct_companies=True)
    gone, kept = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    gone_subject, _ = await introspect(http, sandbox.url, gone["access_token"])
    kept_subject, _ = await introspect(http, sandbox.url, kept["access_token"])
    assert await revoke_subject(sandbox.url, gone_subject) == 1
    assert (await api_get(http, sandbox.url, "/v1/introspect", gone["access_token"]))[0] == 401
    status, body = await refresh(http, sandbox.url, gone["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await introspect(http, sandbox.url, kept["access_token"]))[0] == kept_subject
    status, renewed = await refresh(http, sandbox.url, kept["refresh_token"])
    assert status == 200
    assert (await api_get(http, sandbox.url, "/v1/introspect", renewed["access_token"]))[0] == 200
    assert await revoke_subject(sandbox.url, gone_subject) == 0  # already revoked
    assert await revoke_subject(sandbox.url, "urn:pleo:company:nobody") == 0
    revoked = {g["subject"]: g["revoked"] for g in await get_grants(sandbox.url)}
    assert revoked == {gone_subject: True, kept_subject: False}
    stats = await get_stats(sandbox.url)
    assert (stats["active_grants"], stats["reuse_detected"]) == (1, 0)


async def test_revoking_the_shared_subject_ends_every_grant_of_it(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        await obtain_tokens(http, sandbox.url)
    assert await revoke_subject(sandbox.url, SHARED_SUBJECT) == 2
    assert (await get_stats(sandbox.url))["active_grants"] == 0


@pytest.mark.parametrize("body", [None, {}])
async def test_revoke_without_a_subject_ends_every_grant(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, body: dict[str, str] | None
) -> None:
    await set_knobs(sandbox.url, distinct_companies=True)
    issued = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    async with http.post(f"{sandbox.url}/_sandbox/revoke", json=body) as r:
        assert r.status == 200
        assert await r.json() == {"revoked_grants": 2}
    for tokens in issued:
        status, _ = await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"])
        assert status == 401
    assert all(g["revoked"] for g in await get_grants(sandbox.url))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"null",
        b'{"subject": 5}',
        b'{"subject": ""}',
        b'{"subject": null}',
        b'{"subject": "urn:pleo:company:x", "extra": 1}',
    ],
)
async def test_bad_revoke_bodies_are_refused_and_revoke_nothing(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, body: bytes
) -> None:
    tokens = await obtain_tokens(http, sandbox.url)
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{sandbox.url}/_sandbox/revoke", data=body, headers=headers) as r:
        assert r.status == 400
        assert "error" in await r.json()
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 200


async def test_grant_list_counts_refreshes_and_shows_no_token(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert await get_grants(sandbox.url) == []
    await set_knobs(sandbox.url, distinct_companies=True)
    busy, idle = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    issued, current = [busy, idle], busy
    for _ in range(3):
        status, current = await refresh(http, sandbox.url, current["refresh_token"])
        assert status == 200
        issued.append(current)
    async with http.get(f"{sandbox.url}/_sandbox/grants") as r:
        assert r.status == 200
        raw = await r.text()
    assert "sbx_at_" not in raw
    assert "sbx_rt_" not in raw
    for tokens in issued:
        assert tokens["access_token"] not in raw
        assert tokens["refresh_token"] not in raw
    grants = await get_grants(sandbox.url)
    assert all(set(g) == GRANT_FIELDS for g in grants)
    assert len({g["id"] for g in grants}) == 2
    summary = [(g["company_name"], g["refreshes"], g["revoked"]) for g in grants]
    assert summary == [("Sandbox Company 1", 3, False), ("Sandbox Company 2", 0, False)]
    assert (await get_stats(sandbox.url))["refresh_grants"] == 3


async def test_refresh_token_reuse_is_counted_on_its_own_grant(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, distinct_companies=True)
    copied, clean = [await obtain_tokens(http, sandbox.url) for _ in range(2)]
    _, renewed = await refresh(http, sandbox.url, copied["refresh_token"])
    status, body = await refresh(http, sandbox.url, copied["refresh_token"])  # the replay
    assert (status, body["error"]) == (400, "invalid_grant")
    status, _ = await refresh(http, sandbox.url, clean["refresh_token"])
    assert status == 200
    grants = await get_grants(sandbox.url)
    summary = [(g["reuse_detected"], g["revoked"], g["refreshes"]) for g in grants]
    assert summary == [(1, True, 1), (0, False, 1)]
    stats = await get_stats(sandbox.url)
    assert (stats["reuse_detected"], stats["active_grants"]) == (1, 1)
    assert (await api_get(http, sandbox.url, "/v1/introspect", renewed["access_token"]))[0] == 401


# -- API ------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer sbx_at_unknown", "Basic abc"])
async def test_api_without_a_valid_bearer_is_401(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.get(f"{sandbox.url}/v2/employees", headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["type"] == "unauthorized"
    assert (await get_stats(sandbox.url))["api_by_path"] == {"/v2/employees": 1}


async def test_missing_scope_is_403(sandbox: RunningSandbox, http: aiohttp.ClientSession) -> None:
    tokens = await obtain_tokens(http, sandbox.url, scope="test:test")
    status, body = await api_get(http, sandbox.url, "/v2/employees", tokens["access_token"])
    assert (status, body["type"]) == (403, "forbidden")
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 200


async def test_employee_pagination_walk(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    seen: list[str] = []
    path = "/v2/employees?limit=10"
    pagination: dict[str, Any] = {}
    for _ in range(5):
        status, page = await api_get(http, sandbox.url, path, token)
        assert status == 200
        pagination = page["pagination"]
        assert pagination["total"] == 25
        assert pagination["hasPreviousPage"] == bool(seen)
        assert CURSOR_RE.match(pagination["endCursor"])
        seen += [e["id"] for e in page["data"]]
        if not pagination["hasNextPage"]:
            break
        path = f"/v2/employees?limit=10&after={pagination['endCursor']}"
    assert len(seen) == len(set(seen)) == 25
    back = f"/v2/employees?limit=10&before={pagination['startCursor']}"
    status, page = await api_get(http, sandbox.url, back, token)
    assert [e["id"] for e in page["data"]] == seen[10:20]
    status, body = await api_get(http, sandbox.url, "/v2/employees?after=NOTACURSOR1", token)
    assert (status, body["type"]) == (400, "bad_request")


async def test_large_attachment_streams_with_exact_content(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    size = 50 * 1024 * 1024 + 7
    pattern = bytes(range(256)) * 1024  # byte i of the body is i % 256
    offset = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{sandbox.url}/v1/attachments/{size}", headers=headers) as r:
        assert r.status == 200
        assert r.content_length == size
        async for chunk in r.content.iter_chunked(64 * 1024):
            start = offset % 256
            assert chunk == pattern[start : start + len(chunk)]
            offset += len(chunk)
    assert offset == size


@pytest.mark.parametrize("chunked", [True, False])
async def test_upload_is_hashed_as_it_streams(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, chunked: bool
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    parts = [secrets.token_bytes(256 * 1024) for _ in range(12)]
    expected = hashlib.sha256(b"".join(parts)).hexdigest()

    async def stream() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    data: Any = stream() if chunked else io.BytesIO(b"".join(parts))  # BytesIO: Content-Length
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{sandbox.url}/v1/uploads", data=data, headers=headers) as r:
        assert r.status == 200
        assert await r.json() == {"sha256": expected, "length": 12 * 256 * 1024}
    last = (await get_stats(sandbox.url))["last_upload"]
    assert last["sha256"] == expected
    assert last["chunked"] is chunked
    assert last["content_length"] == (None if chunked else 12 * 256 * 1024)


async def test_echo_keeps_raw_path_headers_and_sets_two_cookies(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    raw = "/v1/echo/a%2Fb/entries:search?q=%2F&q=x"
    headers = CIMultiDict([("Authorization", f"Bearer {token}"), ("X-Rep", "1"), ("X-Rep", "2")])
    url = URL(sandbox.url + raw, encoded=True)
    async with http.request("PATCH", url, data=b"hello", headers=headers) as r:
        assert r.status == 200
        assert r.headers.getall("Set-Cookie") == ["sbx_a=1; Path=/", "sbx_b=2; Path=/"]
        body = await r.json()
    assert body["method"] == "PATCH"
    assert body["raw_path"] == raw
    assert [v for k, v in body["headers"] if k == "X-Rep"] == ["1", "2"]
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert body["body_length"] == 5


async def test_accounting_entries_search_with_colon(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    search = f"{sandbox.url}/v1/accounting-entries:search?limit=5"
    async with http.post(search, json={"filter": {"a": 1}}, headers=headers) as r:
        assert r.status == 200
        body = await r.json()
    assert body["request"] == {"query": {"limit": ["5"]}, "body": {"filter": {"a": 1}}}
    assert body["data"] == []


# -- knobs ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["500", "503", "429"])
async def test_token_failures_fail_the_next_calls_then_recover(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, mode: str
) -> None:
    tokens = await obtain_tokens(http, sandbox.url)
    await set_knobs(sandbox.url, token_failures=2, token_failure_mode=mode)
    for _ in range(2):
        status, _ = await refresh(http, sandbox.url, tokens["refresh_token"])
        assert status == int(mode)
    status, _ = await refresh(http, sandbox.url, tokens["refresh_token"])
    assert status == 200  # the failed calls did not spend the refresh token


async def test_timeout_mode_outlasts_a_short_client_timeout(sandbox: RunningSandbox) -> None:
    await set_knobs(sandbox.url, token_failures=1, token_failure_mode="timeout")
    short = aiohttp.ClientTimeout(total=0.5)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=short) as session:
        with pytest.raises(asyncio.TimeoutError):
            await token_call(session, sandbox.url, {"grant_type": "refresh_token"})
    assert time.monotonic() - started < 5


async def test_close_does_not_wait_for_a_timeout_mode_call() -> None:
    running = await start_sandbox()
    await set_knobs(running.url, token_failures=1, token_failure_mode="timeout")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        call = asyncio.create_task(token_call(session, running.url, {}))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await running.close()
        assert time.monotonic() - started < 5
        status, _ = await call
    assert status == 503


async def test_garbage_mode_answers_200_with_non_json(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await set_knobs(sandbox.url, token_failures=1, token_failure_mode="garbage")
    async with http.post(
        f"{sandbox.url}/oauth/token", data={}, headers={"Authorization": BASIC}
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ContentTypeError):
            await r.json()


async def test_reset_mode_drops_the_connection(sandbox: RunningSandbox) -> None:
    await set_knobs(sandbox.url, token_failures=1, token_failure_mode="reset")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await token_call(session, sandbox.url, {"grant_type": "refresh_token"})


async def test_no_refresh_token_mode_still_rotates(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    old = await obtain_tokens(http, sandbox.url)
    await set_knobs(sandbox.url, token_failures=1, token_failure_mode="no_refresh_token")
    status, new = await refresh(http, sandbox.url, old["refresh_token"])
    assert status == 200
    assert "refresh_token" not in new
    assert (await api_get(http, sandbox.url, "/v1/introspect", new["access_token"]))[0] == 200
    status, body = await refresh(http, sandbox.url, old["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_api_401_once(sandbox: RunningSandbox, http: aiohttp.ClientSession) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    await set_knobs(sandbox.url, api_401_once=True)
    assert (await api_get(http, sandbox.url, "/v1/introspect", token))[0] == 401
    assert (await api_get(http, sandbox.url, "/v1/introspect", token))[0] == 200


async def test_latency_knob_slows_the_api(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    token = (await obtain_tokens(http, sandbox.url))["access_token"]
    await set_knobs(sandbox.url, latency=0.3)
    started = time.monotonic()
    assert (await api_get(http, sandbox.url, "/v1/introspect", token))[0] == 200
    assert time.monotonic() - started >= 0.3


async def test_token_latency_knob_slows_only_the_token_endpoint(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    tokens = await obtain_tokens(http, sandbox.url)
    await set_knobs(sandbox.url, token_latency=0.5)
    started = time.monotonic()
    assert (await api_get(http, sandbox.url, "/v1/introspect", tokens["access_token"]))[0] == 200
    assert time.monotonic() - started < 0.5
    status, _ = await refresh(http, sandbox.url, tokens["refresh_token"])
    assert status == 200
    assert time.monotonic() - started >= 0.5


async def test_a_refresh_whose_client_left_during_the_latency_still_rotates(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    """Pleo finishes a request it received even if nobody is left to read the answer."""
    tokens = await obtain_tokens(http, sandbox.url)
    await set_knobs(sandbox.url, token_latency=0.5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await refresh(http, sandbox.url, tokens["refresh_token"])
    await asyncio.sleep(0.6)
    await set_knobs(sandbox.url, token_latency=0)
    status, body = await refresh(http, sandbox.url, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await get_stats(sandbox.url))["reuse_detected"] == 1


@pytest.mark.parametrize(
    "knobs",
    [
        {"no_such_knob": 1},
        {"token_latency": -1},
        {"token_failures": -1},
        {"token_failure_mode": "explode"},
        {"distinct_companies": "yes"},
    ],
)
async def test_bad_knobs_are_refused(
    sandbox: RunningSandbox, http: aiohttp.ClientSession, knobs: dict[str, object]
) -> None:
    async with http.post(f"{sandbox.url}/_sandbox/knobs", json=knobs) as r:
        assert r.status == 400
    async with http.get(f"{sandbox.url}/_sandbox/knobs") as r:
        assert (await r.json())["token_failures"] == 0


async def test_reset_stats(sandbox: RunningSandbox, http: aiohttp.ClientSession) -> None:
    await obtain_tokens(http, sandbox.url)
    await reset_stats(sandbox.url)
    stats = await get_stats(sandbox.url)
    assert (stats["code_grants"], stats["token_requests"], stats["active_grants"]) == (0, 0, 1)


async def test_serve_forever_prints_its_url_and_stops_on_cancel(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(serve_sandbox_forever(SandboxSettings(), host="127.0.0.1", port=0))
    printed = ""
    for _ in range(100):
        await asyncio.sleep(0.05)
        printed += capsys.readouterr().out
        if printed:
            break
    found = re.search(r"http://127\.0\.0\.1:\d+", printed)
    assert found is not None
    stats = await get_stats(found.group(0))
    assert stats["token_requests"] == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{found.group(0)}/_sandbox/stats")


async def test_mint_makes_consented_grants_with_spread_lifetimes(sandbox: RunningSandbox) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sandbox.url}/_sandbox/mint", json={"count": 20, "ttl_min": 5, "ttl_max": 40}
        ) as resp:
            assert resp.status == 200
            grants = (await resp.json())["grants"]
        async with session.post(f"{sandbox.url}/_sandbox/mint", json={"count": 0}) as resp:
            assert resp.status == 400
        assert len({g["subject"] for g in grants}) == 20
        assert all(5 <= g["expires_in"] <= 40 for g in grants)
        assert len({g["expires_in"] for g in grants}) > 5
        headers = {"Authorization": f"Bearer {grants[3]['access_token']}"}
        async with session.get(f"{sandbox.url}/v1/introspect", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["subjectURN"] == grants[3]["subject"]


async def test_token_requests_in_flight_are_measured(sandbox: RunningSandbox) -> None:
    await set_knobs(sandbox.url, latency=0.3)
    async with aiohttp.ClientSession() as session:

        async def ask() -> None:
            async with session.post(
                f"{sandbox.url}/oauth/token", data={"grant_type": "refresh_token"}
            ) as resp:
                await resp.read()

        await asyncio.gather(*(ask() for _ in range(5)))
    assert (await get_stats(sandbox.url))["token_in_flight_max"] == 5
