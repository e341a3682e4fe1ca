"""Test support: obtain real tokens from the sandbox, and configs pointing at it."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from proxy.config import Config, Refresh, Timeouts
from proxy.connect import pkce
from proxy.demo import demo_config
from proxy.lifecycle import oauth
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from tests.processes import import_tokens, start_proxy, stop, wait_for

SCOPES = ("users:read", "test:test")


def sandbox_config(
    sandbox_url: str,
    state_dir: Path,
    *,
    port: int = 0,
    redirect_uri: str = "http://localhost:8080/_proxy/callback",
    before_expiry: float = 120.0,
    client_secret: str = "sandbox-secret",
) -> Config:
    """The demo's configuration for the sandbox at `sandbox_url`, with test timeouts."""
    config = demo_config(port=port, sandbox_url=sandbox_url, state_dir=state_dir)
    return replace(
        config,
        pleo=replace(
            config.pleo,
            client_secret=Secret(client_secret),
            scopes=SCOPES,
            redirect_uri=redirect_uri,
        ),
        refresh=Refresh(before_expiry=before_expiry),
        timeouts=Timeouts(token_request=5.0, connect=2.0, read=30.0, shutdown=5.0),
    )


def with_redirect(config: Config, redirect_uri: str) -> Config:
    return replace(config, pleo=replace(config.pleo, redirect_uri=redirect_uri))


async def grant_tokens(config: Config, *, now: float) -> TokenSet:
    """Run the code flow against the sandbox with auto-approve on; return the tokens."""
    verifier = pkce.new_verifier()
    url = oauth.build_authorize_url(
        config.pleo, state="teststate", code_challenge=pkce.challenge_s256(verifier)
    )
    async with aiohttp.ClientSession() as session:
        await session.post(
            f"{config.pleo.api_url}/_sandbox/knobs",
            json={"auto_approve": True, "redirect_uris": [config.pleo.redirect_uri]},
        )
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            location = resp.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        return await oauth.exchange_code(
            session, config.pleo, code=Secret(code), code_verifier=verifier, timeout=5, now=now
        )


async def authorise_store(sandbox_url: str, config_file: Path, state_dir: Path) -> None:
    """Tokens from the sandbox, stored through `pleo-proxy import-tokens --config FILE`."""
    tokens = await grant_tokens(sandbox_config(sandbox_url, state_dir), now=time.time())
    await asyncio.to_thread(import_tokens, config_file, tokens)


async def traffic(ports: list[int], until: float, results: Counter[str], workers: int) -> None:
    """`workers` clients GET /v1/introspect round-robin over `ports` until `until`."""

    async def worker(index: int) -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < until:
                port = ports[index % len(ports)]
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/introspect") as resp:
                        await resp.read()
                        results[str(resp.status)] += 1
                except aiohttp.ClientError as exc:
                    results[type(exc).__name__] += 1

    await asyncio.gather(*(worker(i) for i in range(workers)))


async def traffic_through_proxies(
    configs: list[Path], ports: list[int], seconds: float, *, workers: int
) -> Counter[str]:
    """Start `pleo-proxy run` for each config, send traffic for `seconds`, stop them."""
    procs = [start_proxy(config) for config in configs]
    try:
        for port in ports:
            await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/healthz")
        results: Counter[str] = Counter()
        await traffic(ports, time.monotonic() + seconds, results, workers=workers)
        return results
    finally:
        for proc in procs:
            stop(proc)


async def traffic_to_connections(
    ports: list[int], names: list[str], until: float, *, clients: int
) -> Counter[str]:
    """`clients` clients GET /v1/introspect for random connections (by header) on random
    ports until `until`; the answers counted by status (or exception kind)."""
    results: Counter[str] = Counter()

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < until:
                url = f"http://127.0.0.1:{rng.choice(ports)}/v1/introspect"
                headers = {"X-Pleo-Connection": rng.choice(names)}
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        results[str(resp.status)] += 1
                except aiohttp.ClientError as exc:
                    results[type(exc).__name__] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results
