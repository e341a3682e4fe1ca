"""Thousands of connections in one `pleo-proxy run`, fair to Pleo: 2,000 connections whose
access tokens all expire within 40 s, traffic to random ones for 45 s. Every request must
succeed, no refresh token may be presented twice, the token endpoint never sees more
calls at once than `refresh.max_concurrent`, and starting up calls Pleo not at all."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.flows import traffic_to_connections
from tests.processes import (
    cli,
    free_port,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.sandboxes import get_grants, get_stats, reset_stats, set_knobs

CONNECTIONS = int(os.environ.get("PLEO_PROXY_SCALE_CONNECTIONS", "2000"))
SECONDS = float(os.environ.get("PLEO_PROXY_SCALE_SECONDS", "45"))
MAX_CONCURRENT = 4
CLIENTS = 24
LATER_TTL = 30  # seconds every rotated access token lives


async def _mint(sandbox_url: str) -> list[dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sandbox_url}/_sandbox/mint",
            json={"count": CONNECTIONS, "ttl_min": 5, "ttl_max": 40, "seed": 7},
        ) as resp,
    ):
        assert resp.status == 200
        grants: list[dict[str, object]] = (await resp.json())["grants"]
        return grants


@pytest.mark.timeout(SECONDS + 240)
async def test_two_thousand_connections_expiring_under_traffic(tmp_path: Path) -> None:
    port = free_port()
    names = [f"customer-{i:04d}" for i in range(CONNECTIONS)]
    with sandbox_process() as sandbox_url:
        await set_knobs(sandbox_url, access_ttl=LATER_TTL)
        config = write_config(
            tmp_path / "proxy.yaml",
            sandbox_url=sandbox_url,
            port=port,
            state_dir=tmp_path / "state",
            connections={"configured": []},
            refresh={"max_concurrent": MAX_CONCURRENT},
        )
        grants = await _mint(sandbox_url)
        lines = [
            json.dumps(
                {
                    "connection": name,
                    **{k: g[k] for k in ("access_token", "refresh_token", "expires_in")},
                }
            )
            for name, g in zip(names, grants, strict=True)
        ]
        code, _, err = await asyncio.to_thread(
            cli, "import-tokens", "--config", str(config), stdin="\n".join(lines).encode()
        )
        assert code == 0, err
        await reset_stats(sandbox_url)
        # Token calls take a while, as over the internet: calls pile up unless capped.
        await set_knobs(sandbox_url, latency=0.05)
        proc = start_proxy(config)
        try:
            await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/healthz")
            assert (await get_stats(sandbox_url))["token_requests"] == 0, "start-up called Pleo"
            started = time.monotonic()
            results = await traffic_to_connections(
                [port], names, started + SECONDS, clients=CLIENTS
            )
            elapsed = time.monotonic() - started
        finally:
            stop(proc)
        stats = await get_stats(sandbox_url)
        per_grant = await get_grants(sandbox_url)
    assert set(results) == {"200"}, results
    assert stats["reuse_detected"] == 0
    assert 0 < stats["token_in_flight_max"] <= MAX_CONCURRENT
    # Every first token expired within the run, so nearly every connection was refreshed.
    assert stats["refresh_grants"] >= CONNECTIONS * 0.9
    # At most one refresh per rotation: the first token, then one per later token's
    # half-life at the most (refreshed no earlier than half its lifetime before expiry).
    most = 1 + int(elapsed / (LATER_TTL / 2)) + 1
    assert max(g["refreshes"] for g in per_grant) <= most
    assert all(not g["revoked"] for g in per_grant)
