"""One connection's sealed entry copied over another's, in the file store and in Redis, then
served for real against the sandbox: the victim's requests are refused with a JSON 503 and
never forwarded (with the other customer's token or at all), and the copied connection
keeps working. Someone who can write the store but not read the key must not be able to
make one customer's requests carry another customer's grant."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.cli_tokens import with_registry
from proxy.config import Config
from proxy.lifecycle.registry import Registry
from proxy.store.redis import config_prefix, entry_keys
from proxy.tokenset import TokenSet
from tests.connections import connections_config, distinct_companies, get_json, serving, url_of
from tests.flows import grant_tokens
from tests.redis_server import redis_url
from tests.sandboxes import RunningSandbox, get_stats, sandbox

__all__ = ["redis_url", "sandbox"]

VICTIM_PATH = "/v1/echo/bravo-only"


async def install(config: Config, names: list[str]) -> dict[str, TokenSet]:
    """One sandbox grant per name (another company each), as `import-tokens` stores it."""
    grants = {name: await grant_tokens(config, now=time.time()) for name in names}

    async def store(registry: Registry) -> int:
        for name, tokens in grants.items():
            await registry.install(name, tokens)
        return 0

    await with_registry(config, store)
    return grants


async def subjects(config: Config) -> dict[str, str]:
    async with serving(config), aiohttp.ClientSession() as session:
        found = {}
        for name in ("alpha", "bravo"):
            status, body = await get_json(session, f"{url_of(config)}/c/{name}/v1/introspect")
            assert status == 200, body
            found[name] = body["data"]["subjectURN"]
    assert found["alpha"] != found["bravo"]
    return found


async def copy_file_entry(config: Config) -> None:
    directory = config.tokens.path.parent / "connections"
    (directory / "bravo.enc").write_bytes((directory / "alpha.enc").read_bytes())


async def copy_redis_entry(config: Config) -> None:
    assert config.tokens.redis_url is not None
    prefix = config_prefix(config)
    client = aioredis.Redis.from_url(config.tokens.redis_url)
    try:
        value = await client.get(entry_keys(prefix, "alpha").state)
        assert value is not None
        await client.set(entry_keys(prefix, "bravo").state, value)
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_an_entry_copied_over_another_connection_is_refused_and_never_forwarded(
    backend: str, sandbox: RunningSandbox, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = connections_config(sandbox.url, tmp_path)
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        config = replace(config, tokens=replace(config.tokens, store="redis", redis_url=url))
    await distinct_companies(sandbox.url, config)
    grants = await install(config, ["alpha", "bravo"])
    subject = await subjects(config)

    await (copy_redis_entry if backend == "redis" else copy_file_entry)(config)

    main = url_of(config)
    async with serving(config), aiohttp.ClientSession() as session:
        for url, headers in (
            (f"{main}/c/bravo{VICTIM_PATH}", {}),
            (f"{main}{VICTIM_PATH}", {"X-Pleo-Connection": "bravo"}),
        ):
            async with session.get(url, headers=headers) as resp:
                text = await resp.text()
                assert resp.status == 503, text
                assert resp.content_type == "application/json"
                body = await resp.json()
            assert body["error"] == "store_error"
            assert "bravo" in body["detail"]
            for tokens in grants.values():
                assert tokens.access_token.reveal() not in text
                assert tokens.refresh_token is not None
                assert tokens.refresh_token.reveal() not in text
        # The copied connection is untouched: still its own company.
        status, body = await get_json(session, f"{main}/c/alpha/v1/introspect")
        assert (status, body["data"]["subjectURN"]) == (200, subject["alpha"])
        # Asked again, the victim is still refused: the copy is never adopted.
        status, body = await get_json(session, f"{main}/c/bravo{VICTIM_PATH}")
        assert (status, body["error"]) == (503, "store_error")
    # The sandbox counts every API request it receives, whatever its bearer.
    assert VICTIM_PATH not in (await get_stats(sandbox.url))["api_by_path"]
