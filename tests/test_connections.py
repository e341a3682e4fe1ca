"""Many connections in one proxy, against the bundled sandbox: each request carries only
its own connection's tokens, one connection's end touches no other, refusals are never
forwarded, and a connection another process creates or authorises is served at once."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from proxy.config import Config
from tests.connections import (
    connections_config,
    distinct_companies,
    get_json,
    give_tokens,
    serving,
    url_of,
    wait_until,
    webhook_receiver,
    write_connections_config,
)
from tests.flows import grant_tokens
from tests.processes import cli, free_port
from tests.sandboxes import RunningSandbox, get_grants, get_stats, revoke_subject, sandbox

__all__ = ["sandbox"]

NAMES = ["byport", "byprefix", "byheader"]


def three(sandbox: RunningSandbox, tmp_path: Path, webhook: str | None = None) -> Config:
    return connections_config(
        sandbox.url,
        tmp_path,
        names=[("byport", free_port()), ("byprefix", None), ("byheader", None)],
        webhook_url=webhook,
    )


async def subject_via(session: aiohttp.ClientSession, url: str, **kwargs: object) -> str:
    status, body = await get_json(session, url, **kwargs)
    assert status == 200, body
    subject: str = body["data"]["subjectURN"]
    return subject


async def test_three_connections_carry_only_their_own_tokens(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with webhook_receiver() as receiver:
        config = three(sandbox, tmp_path, receiver.url)
        await distinct_companies(sandbox.url, config)
        await give_tokens(config, NAMES)
        grants = {g["subject"] for g in await get_grants(sandbox.url)}
        main = url_of(config)
        own_port = config.connections.configured[0].port
        async with serving(config), aiohttp.ClientSession() as session:
            seen = {
                "byport": await subject_via(session, f"http://127.0.0.1:{own_port}/v1/introspect"),
                "byprefix": await subject_via(session, f"{main}/c/byprefix/v1/introspect"),
                "byheader": await subject_via(
                    session, f"{main}/v1/introspect", headers={"X-Pleo-Connection": "byheader"}
                ),
            }
            assert len(set(seen.values())) == 3
            assert set(seen.values()) == grants

            # The selector never reaches Pleo: neither the header nor the prefix.
            status, echoed = await get_json(
                session,
                f"{main}/c/byprefix/v1/echo/x?q=1",
                headers={"X-Pleo-Connection": "byprefix"},
            )
            assert status == 200
            assert echoed["raw_path"] == "/v1/echo/x?q=1"
            assert "x-pleo-connection" not in {k.lower() for k, _ in echoed["headers"]}

            # One connection revoked at Pleo ends only that one.
            await revoke_subject(sandbox.url, seen["byheader"])
            status, body = await get_json(
                session, f"{main}/v1/introspect", headers={"X-Pleo-Connection": "byheader"}
            )
            assert status == 503
            assert body["error"] == "reauthorization_required"
            assert body["authorize_url"].endswith("/_proxy/authorize?connection=byheader")
            for url in (
                f"http://127.0.0.1:{own_port}/v1/introspect",
                f"{main}/c/byprefix/v1/introspect",
            ):
                assert (await get_json(session, url))[0] == 200
            status, ready = await get_json(session, f"{main}/c/byheader/_proxy/readyz")
            assert (status, ready["reason"]) == (503, "reauthorization_required")
            assert (await get_json(session, f"{main}/c/byprefix/_proxy/readyz"))[0] == 200

            def ended() -> bool:
                return any(
                    e["connection"] == "byheader" and e["state"] == "reauthorization_required"
                    for e in receiver.events
                )

            await wait_until(ended)
        event = next(e for e in receiver.events if e["state"] == "reauthorization_required")
        assert event["event"] == "connection.state"
        assert event["previous"] in ("authorised", "refreshing")
        assert event["at"].endswith("Z")
        assert receiver.bad_signatures == 0
        assert {e["connection"] for e in receiver.events} <= set(NAMES)
        assert (await get_stats(sandbox.url))["reuse_detected"] == 0


async def test_unknown_missing_and_mismatched_connections_are_never_forwarded(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = three(sandbox, tmp_path)
    await distinct_companies(sandbox.url, config)
    await give_tokens(config, NAMES)
    main = url_of(config)
    own_port = config.connections.configured[0].port
    async with serving(config), aiohttp.ClientSession() as session:
        before = (await get_stats(sandbox.url))["api_requests"]
        cases = [
            (f"{main}/v1/introspect", {}, 400, "connection_required"),
            (f"{main}/c/nosuch/v1/introspect", {}, 404, "unknown_connection"),
            (f"{main}/v1/introspect", {"X-Pleo-Connection": "nosuch"}, 404, "unknown_connection"),
            (
                f"{main}/v1/introspect",
                {"X-Pleo-Connection": "Bad Name"},
                400,
                "invalid_connection_name",
            ),
            (
                f"{main}/c/byprefix/v1/x",
                {"X-Pleo-Connection": "byheader"},
                400,
                "connection_mismatch",
            ),
            (
                f"http://127.0.0.1:{own_port}/v1/introspect",
                {"X-Pleo-Connection": "byheader"},
                400,
                "connection_mismatch",
            ),
            (f"{main}/c/byprefix/_proxy/nosuch", {}, 404, "not_found"),
            (f"http://127.0.0.1:{own_port}/_proxy/connections", {}, 404, "not_found"),
        ]
        for url, headers, status, code in cases:
            got, body = await get_json(session, url, headers=headers)
            assert (got, body["error"]) == (status, code), url
        async with session.post(
            f"{main}/c/nosuch/v1/uploads", data=b"x" * 10_000, headers={"Expect": "100-continue"}
        ) as resp:
            assert resp.status == 404
        assert (await get_stats(sandbox.url))["api_requests"] == before


async def test_a_connection_made_by_another_process_is_served_within_a_second(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """`pleo-proxy connect` and `import-tokens --connection` in other processes, while the
    proxy runs: the new connection serves without a restart; DELETE forgets it."""
    config = connections_config(sandbox.url, tmp_path, names=[("first", None)])
    await distinct_companies(sandbox.url, config)
    await give_tokens(config, ["first"])
    config_file = write_connections_config(tmp_path / "c.yaml", config)
    main = url_of(config)
    async with serving(config), aiohttp.ClientSession() as session:
        code, out, err = await asyncio.to_thread(
            cli, "connect", "later", "--config", str(config_file)
        )
        assert code == 0, err
        assert out.strip().startswith(f"{main.replace('127.0.0.1', 'localhost')}/_proxy/authorize?")
        status, body = await get_json(session, f"{main}/c/later/v1/introspect")
        assert (status, body["error"]) == (503, "reauthorization_required")
        tokens = await _sandbox_tokens(config)
        code, _, err = await asyncio.to_thread(
            cli,
            "import-tokens",
            "--connection",
            "later",
            "--config",
            str(config_file),
            stdin=tokens,
        )
        assert code == 0, err

        async def served() -> bool:
            return (await get_json(session, f"{main}/c/later/v1/introspect"))[0] == 200

        await wait_until(served, timeout=3)
        first = await subject_via(session, f"{main}/c/first/v1/introspect")
        assert first != await subject_via(session, f"{main}/c/later/v1/introspect")
        code, out, _ = await asyncio.to_thread(cli, "status", "--config", str(config_file))
        listed = {c["name"]: c["state"] for c in json.loads(out)["connections"]}
        assert listed == {"first": "authorised", "later": "authorised"}


async def _sandbox_tokens(config: Config) -> bytes:
    tokens = await grant_tokens(config, now=time.time())
    doc = {
        "access_token": tokens.access_token.reveal(),
        "refresh_token": tokens.refresh_token.reveal() if tokens.refresh_token else None,
        "expires_in": int(tokens.expires_at - time.time()),
    }
    return json.dumps(doc).encode()
