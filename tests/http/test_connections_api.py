"""The admin API (`/_proxy/connections[/NAME]`) against a served proxy and the sandbox:
every route, every refusal, and that a refusal changes nothing and never reaches Pleo."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.cli_tokens import with_registry
from proxy.config import Config
from proxy.lifecycle.registry import Registry
from proxy.tokenset import TokenSet
from tests.connections import (
    ADMIN_KEY,
    admin_headers,
    connections_config,
    distinct_companies,
    get_json,
    give_tokens,
    serving,
    url_of,
    wait_until,
)
from tests.flows import grant_tokens
from tests.sandboxes import RunningSandbox, get_grants, get_stats, sandbox

__all__ = ["sandbox"]

pytestmark = pytest.mark.timeout(60)

TIMEOUT = aiohttp.ClientTimeout(total=15)
API = "/_proxy/connections"
PARTNER = "https://partner.example"
MAX_BODY = 16 * 1024


@asynccontextmanager
async def admin_world(
    sandbox: RunningSandbox,
    tmp_path: Path,
    *,
    names: list[tuple[str, int | None]] | None = None,
    admin: bool = True,
) -> AsyncIterator[tuple[Config, aiohttp.ClientSession]]:
    """A served proxy (only PARTNER may be returned to) and a client for it."""
    config = connections_config(
        sandbox.url, tmp_path, names=names, admin=admin, return_to_origins=(PARTNER,)
    )
    await distinct_companies(sandbox.url, config)
    async with serving(config), aiohttp.ClientSession(timeout=TIMEOUT) as client:
        yield config, client


async def call(
    client: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of one admin request carrying the admin key."""
    headers = {**admin_headers(), **kwargs.pop("headers", {})}
    async with client.request(method, url, headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def listed(client: aiohttp.ClientSession, config: Config) -> dict[str, str]:
    status, body = await call(client, "GET", url_of(config) + API)
    assert status == 200, body
    return {c["name"]: c["state"] for c in body["connections"]}


def entry_of(tmp_path: Path, name: str) -> Path:
    return tmp_path / "connections" / f"{name}.enc"


def code_of(authorize_url: str) -> str:
    return parse_qs(urlsplit(authorize_url).query)["setup"][0]


async def grant_and_install(config: Config, names: list[str]) -> list[TokenSet]:
    """Like `give_tokens`, but the tokens are kept so a test can look for them."""
    grants = [await grant_tokens(config, now=time.time()) for _ in names]
    subjects = [g["subject"] for g in (await get_grants(config.pleo.api_url))[-len(names) :]]

    async def install(registry: Registry) -> int:
        for name, tokens, subject in zip(names, grants, subjects, strict=True):
            await registry.install(name, tokens, subject=subject)
        return 0

    await with_registry(config, install)
    return grants


async def test_list_shows_names_and_states_never_a_token(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path, names=[("alpha", None), ("beta", None)]) as (
        config,
        client,
    ):
        grants = await grant_and_install(config, ["alpha"])
        status, made = await call(client, "POST", url_of(config) + API, json={"name": "gamma"})
        assert status == 201, made

        async def alpha_authorised() -> bool:
            return (await listed(client, config)).get("alpha") == "authorised"

        await wait_until(alpha_authorised, timeout=5)
        async with client.get(url_of(config) + API, headers=admin_headers()) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            raw = await resp.text()
        doc = json.loads(raw)
        states = {c["name"]: c["state"] for c in doc["connections"]}
        assert states == {"alpha": "authorised", "beta": "unauthorised", "gamma": "unauthorised"}
        alpha = next(c for c in doc["connections"] if c["name"] == "alpha")
        assert alpha["subject"].startswith("urn:pleo:company:")
        assert alpha["configured"] is True
        assert next(c for c in doc["connections"] if c["name"] == "gamma")["configured"] is False
        secrets = [grants[0].access_token.reveal(), code_of(made["authorize_url"])]
        assert grants[0].refresh_token is not None
        secrets.append(grants[0].refresh_token.reveal())
        for secret in secrets:
            assert secret not in raw
        # The sandbox's token shapes: no token of any grant is in the answer.
        assert "sbx_at_" not in raw
        assert "sbx_rt_" not in raw
        status, one = await call(client, "GET", url_of(config) + API + "/alpha")
        assert status == 200
        assert "sbx_" not in json.dumps(one)


async def test_post_creates_then_renews_the_link_and_refuses_a_connected_one(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        url = url_of(config) + API
        before = time.time()
        status, first = await call(client, "POST", url, json={"name": "acme"})
        assert status == 201, first
        assert set(first) == {"name", "authorize_url", "expires_at"}
        assert first["name"] == "acme"
        parts = urlsplit(first["authorize_url"])
        assert parts.path == "/_proxy/authorize"
        assert parse_qs(parts.query)["connection"] == ["acme"]
        assert len(code_of(first["authorize_url"])) >= 32
        assert first["expires_at"].endswith("Z")
        expires = datetime.fromisoformat(first["expires_at"].replace("Z", "+00:00")).timestamp()
        assert before + 24 * 3600 - 5 <= expires <= time.time() + 24 * 3600 + 5
        assert entry_of(tmp_path, "acme").exists()

        # Not connected yet: a new link (and a new code), the connection already existed.
        status, second = await call(client, "POST", url, json={"name": "acme"})
        assert status == 200, second
        assert code_of(second["authorize_url"]) != code_of(first["authorize_url"])
        assert await listed(client, config) == {"acme": "unauthorised"}

        await give_tokens(config, ["acme"])

        async def connected() -> bool:
            return (await listed(client, config))["acme"] == "authorised"

        await wait_until(connected, timeout=5)
        status, body = await call(client, "POST", url, json={"name": "acme"})
        assert (status, body["error"]) == (409, "already_connected")
        assert "authorize_url" not in body
        assert await listed(client, config) == {"acme": "authorised"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "Acme"}, "invalid_connection_name"),
        ({"name": "-acme"}, "invalid_connection_name"),
        ({"name": "a" * 64}, "invalid_connection_name"),
        ({"name": "../etc"}, "invalid_connection_name"),
        ({"name": 7}, "invalid_connection_name"),
        ({}, "invalid_connection_name"),
        ({"name": "acme", "extra": 1}, "unknown_field"),
        ({"name": "acme", "return_to": "https://evil.example/done"}, "return_to_not_allowed"),
        ({"name": "acme", "return_to": "http://partner.example/done"}, "return_to_not_allowed"),
        ({"name": "acme", "return_to": "https://u@partner.example/x"}, "return_to_not_allowed"),
        ({"name": "acme", "return_to": "/done"}, "return_to_not_allowed"),
        ({"name": "acme", "return_to": "javascript:alert(1)"}, "return_to_not_allowed"),
        ({"name": "acme", "return_to": 5}, "return_to_not_allowed"),
    ],
)
async def test_bad_post_bodies_are_refused_and_create_nothing(
    sandbox: RunningSandbox, tmp_path: Path, body: dict[str, Any], code: str
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        status, answer = await call(client, "POST", url_of(config) + API, json=body)
        assert (status, answer["error"]) == (400, code)
        assert await listed(client, config) == {}
        assert not list(tmp_path.glob("connections/*.enc"))


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'"acme"', b"null", b"", b'{"name": "\xff"}']
)
async def test_non_json_or_non_object_bodies_are_400(
    sandbox: RunningSandbox, tmp_path: Path, raw: bytes
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        headers = {"Content-Type": "application/json"}
        status, answer = await call(client, "POST", url_of(config) + API, data=raw, headers=headers)
        assert (status, answer["error"]) == (400, "invalid_json")
        assert await listed(client, config) == {}


async def test_return_to_in_the_allow_list_is_accepted(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        body = {"name": "acme", "return_to": f"{PARTNER}/connected?x=1"}
        status, answer = await call(client, "POST", url_of(config) + API, json=body)
        assert status == 201, answer
        assert "return_to" not in answer["authorize_url"]


async def test_a_body_over_16_kib_is_413_and_creates_nothing(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        url = url_of(config) + API
        # Exactly the limit is still read: a valid object padded with spaces.
        exact = b'{"name": "atlimit"}'
        exact += b" " * (MAX_BODY - len(exact))
        status, answer = await call(client, "POST", url, data=exact)
        assert status == 201, answer
        over = b'{"name": "overlimit"}' + b" " * MAX_BODY
        status, answer = await call(client, "POST", url, data=over)
        assert (status, answer["error"]) == (413, "body_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read up to the limit
            yield b'{"name": "chunked"}'
            for _ in range(5):
                yield b" " * 4096

        status, answer = await call(client, "POST", url, data=chunks())
        assert (status, answer["error"]) == (413, "body_too_large")
        assert await listed(client, config) == {"atlimit": "unauthorised"}


async def test_get_one_connection(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with admin_world(sandbox, tmp_path, names=[("kept", None)]) as (config, client):
        status, body = await call(client, "GET", url_of(config) + API + "/kept")
        assert status == 200
        assert (body["name"], body["state"], body["configured"]) == ("kept", "unauthorised", True)
        assert body["subject"] is None
        status, body = await call(client, "GET", url_of(config) + API + "/nosuch")
        assert (status, body["error"]) == (404, "unknown_connection")
        for bad in ("Kept", "-kept", "a" * 64, "k%20ept"):
            status, body = await call(client, "GET", url_of(config) + API + "/" + bad)
            assert (status, body["error"]) == (400, "invalid_connection_name"), bad


async def test_delete_forgets_a_runtime_connection_everywhere(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        main = url_of(config)
        status, _ = await call(client, "POST", main + API, json={"name": "made"})
        assert status == 201
        await give_tokens(config, ["made"])
        selector = {"X-Pleo-Connection": "made"}

        async def served() -> bool:
            return (await get_json(client, f"{main}/v1/introspect", headers=selector))[0] == 200

        await wait_until(served, timeout=5)
        assert entry_of(tmp_path, "made").exists()

        status, body = await call(client, "DELETE", main + API + "/made")
        assert (status, body) == (200, {"name": "made", "deleted": True})
        assert not entry_of(tmp_path, "made").exists()
        status, body = await call(client, "GET", main + API + "/made")
        assert (status, body["error"]) == (404, "unknown_connection")
        before = (await get_stats(sandbox.url))["api_requests"]
        for url, headers in (
            (f"{main}/v1/introspect", selector),
            (f"{main}/c/made/v1/introspect", {}),
        ):
            status, body = await get_json(client, url, headers=headers)
            assert (status, body["error"]) == (404, "unknown_connection"), url
        assert (await get_stats(sandbox.url))["api_requests"] == before
        assert await listed(client, config) == {}
        status, body = await call(client, "DELETE", main + API + "/made")
        assert (status, body["error"]) == (404, "unknown_connection")
        status, body = await call(client, "DELETE", main + API + "/Made")
        assert (status, body["error"]) == (400, "invalid_connection_name")


async def test_delete_of_a_configured_connection_leaves_it_unauthorised(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path, names=[("kept", None), ("other", None)]) as (
        config,
        client,
    ):
        main = url_of(config)
        await give_tokens(config, ["kept", "other"])

        async def both() -> bool:
            return set((await listed(client, config)).values()) == {"authorised"}

        await wait_until(both, timeout=5)
        status, body = await call(client, "DELETE", main + API + "/kept")
        assert (status, body["deleted"]) == (200, True)
        status, body = await call(client, "GET", main + API + "/kept")
        assert status == 200
        assert (body["state"], body["subject"], body["configured"]) == (
            "unauthorised",
            None,
            True,
        )
        assert await listed(client, config) == {"kept": "unauthorised", "other": "authorised"}
        before = (await get_stats(sandbox.url))["api_requests"]
        status, body = await get_json(client, f"{main}/c/kept/v1/introspect")
        assert (status, body["error"]) == (503, "reauthorization_required")
        assert (await get_stats(sandbox.url))["api_requests"] == before
        assert (await get_json(client, f"{main}/c/other/v1/introspect"))[0] == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer not-the-admin-key",
        f"Basic {ADMIN_KEY}",
        f"Bearer {ADMIN_KEY}x",
        f"Bearer x{ADMIN_KEY}",
        f"Bearer {ADMIN_KEY} {ADMIN_KEY}",
        f"Bearer{ADMIN_KEY}",
        ADMIN_KEY,
        "Bearer",
    ],
)
async def test_without_the_right_key_every_route_is_401_and_changes_nothing(
    sandbox: RunningSandbox, tmp_path: Path, authorization: str | None
) -> None:
    async with admin_world(sandbox, tmp_path, names=[("kept", None)]) as (config, client):
        await give_tokens(config, ["kept"])
        headers = {} if authorization is None else {"Authorization": authorization}
        url = url_of(config) + API
        for method, target, body in (
            ("GET", url, None),
            ("POST", url, {"name": "sneaky"}),
            ("POST", url, {"name": "kept"}),
            ("GET", url + "/kept", None),
            ("DELETE", url + "/kept", None),
        ):
            async with client.request(method, target, headers=headers, json=body) as resp:
                assert resp.status == 401, (method, target)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
                answer = await resp.json()
            assert answer["error"] == "unauthorized"
            assert ADMIN_KEY not in json.dumps(answer)
        assert entry_of(tmp_path, "kept").exists()
        assert not entry_of(tmp_path, "sneaky").exists()

        async def kept_authorised() -> bool:
            return (await listed(client, config)) == {"kept": "authorised"}

        await wait_until(kept_authorised, timeout=5)


@pytest.mark.parametrize(
    "extra",
    [
        b"\xff",
        "é".encode(),
    ],
    ids=["not-utf8", "utf8"],
)
async def test_a_key_with_non_ascii_bytes_after_it_is_401(
    sandbox: RunningSandbox, tmp_path: Path, extra: bytes
) -> None:
    """Raw header bytes after the key (sent on a socket: clients would not): refused."""
    async with admin_world(sandbox, tmp_path) as (config, client):
        reader, writer = await asyncio.open_connection("127.0.0.1", config.listen.port)
        try:
            writer.write(
                b"POST " + API.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + ADMIN_KEY.encode() + extra + b"\r\n"
                b"Content-Length: 16\r\nConnection: close\r\n\r\n"
                b'{"name": "made"}'
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            writer.close()
            await writer.wait_closed()
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.split(b"\r\n", 1)[0].split()[1] == b"401", answer[:200]
        assert b"\r\nwww-authenticate: bearer " in head
        assert await listed(client, config) == {}


async def test_without_an_admin_key_the_routes_do_not_exist(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path, names=[("kept", None)], admin=False) as (
        config,
        client,
    ):
        url = url_of(config) + API
        before = (await get_stats(sandbox.url))["api_requests"]
        for method, target, body in (
            ("GET", url, None),
            ("POST", url, {"name": "made"}),
            ("GET", url + "/kept", None),
            ("DELETE", url + "/kept", None),
        ):
            status, answer = await call(client, method, target, json=body)
            assert (status, answer["error"]) == (404, "not_found"), (method, target)
        assert (await get_stats(sandbox.url))["api_requests"] == before
        assert not entry_of(tmp_path, "made").exists()


@pytest.mark.parametrize(
    "headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}]
)
async def test_cross_site_changes_are_refused_by_the_guard(
    sandbox: RunningSandbox, tmp_path: Path, headers: dict[str, str]
) -> None:
    async with admin_world(sandbox, tmp_path, names=[("kept", None)]) as (config, client):
        url = url_of(config) + API
        status, body = await call(client, "POST", url, json={"name": "fromevil"}, headers=headers)
        assert (status, body["error"]) == (403, "cross_site_request")
        status, body = await call(client, "DELETE", url + "/kept", headers=headers)
        assert (status, body["error"]) == (403, "cross_site_request")
        assert await listed(client, config) == {"kept": "unauthorised"}
        assert not entry_of(tmp_path, "fromevil").exists()


async def test_a_connection_created_by_post_serves_once_given_tokens(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with admin_world(sandbox, tmp_path) as (config, client):
        main = url_of(config)
        status, _ = await call(client, "POST", main + API, json={"name": "made"})
        assert status == 201
        selector = {"X-Pleo-Connection": "made"}
        before = (await get_stats(sandbox.url))["api_requests"]
        status, body = await get_json(client, f"{main}/v1/introspect", headers=selector)
        assert (status, body["error"]) == (503, "reauthorization_required")
        assert (await get_stats(sandbox.url))["api_requests"] == before
        await give_tokens(config, ["made"])

        async def served() -> bool:
            return (await get_json(client, f"{main}/v1/introspect", headers=selector))[0] == 200

        await wait_until(served, timeout=5)
        status, body = await get_json(client, f"{main}/v1/introspect", headers=selector)
        assert status == 200
        (grant,) = await get_grants(sandbox.url)
        assert body["data"]["subjectURN"] == grant["subject"]
        status, shown = await call(client, "GET", main + API + "/made")
        assert (status, shown["state"]) == (200, "authorised")
