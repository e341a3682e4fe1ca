"""Many connections shared by sidecars through Redis: two real `pleo-proxy run` processes,
fifty connections with 2 s access tokens, traffic to random connections through both.
Every request must succeed and no refresh token may ever be presented twice."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path

import pytest

from proxy.store.crypto import generate_key
from tests.flows import grant_tokens, sandbox_config, traffic_to_connections
from tests.processes import (
    cli,
    free_port,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.redis_server import redis_url  # noqa: F401
from tests.sandboxes import get_grants, get_stats, set_knobs

SECONDS = float(os.environ.get("PLEO_PROXY_REDIS_CONNECTIONS_SECONDS", "30"))
CONNECTIONS = 50
CLIENTS = 16


def _config(tmp_path: Path, index: int, sandbox_url: str, redis: str, port: int) -> Path:
    return write_config(
        tmp_path / f"proxy{index}.yaml",
        sandbox_url=sandbox_url,
        port=port,
        state_dir=tmp_path / f"state{index}",
        tokens={"store": "redis", "redis_url": redis},
        connections={"configured": []},
    )


async def _import(sandbox_url: str, tmp_path: Path, config_file: Path, names: list[str]) -> None:
    config = sandbox_config(sandbox_url, tmp_path / "grants")
    await set_knobs(
        sandbox_url,
        distinct_companies=True,
        auto_approve=True,
        redirect_uris=[config.pleo.redirect_uri],
    )
    lines = []
    for name in names:
        tokens = await grant_tokens(config, now=time.time())
        assert tokens.refresh_token is not None
        doc = {
            "connection": name,
            "access_token": tokens.access_token.reveal(),
            "refresh_token": tokens.refresh_token.reveal(),
            "expires_in": max(1, int(tokens.expires_at - time.time())),
        }
        lines.append(json.dumps(doc))
    code, _, err = await asyncio.to_thread(
        cli, "import-tokens", "--config", str(config_file), stdin="\n".join(lines).encode()
    )
    assert code == 0, err


@pytest.mark.timeout(SECONDS + 120)
async def test_two_proxies_share_fifty_connections_through_redis(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLEO_PROXY_KEY", base64.b64encode(generate_key()).decode())
    ports = [free_port(), free_port()]
    names = [f"customer-{i:02d}" for i in range(CONNECTIONS)]
    with sandbox_process() as sandbox_url:
        configs = [_config(tmp_path, i, sandbox_url, redis_url, p) for i, p in enumerate(ports)]
        await set_knobs(sandbox_url, access_ttl=2)
        await _import(sandbox_url, tmp_path, configs[0], names)
        procs = [start_proxy(config) for config in configs]
        try:
            for port in ports:
                await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/healthz")
            results = await traffic_to_connections(
                ports, names, time.monotonic() + SECONDS, clients=CLIENTS
            )
        finally:
            for proc in procs:
                stop(proc)
        stats = await get_stats(sandbox_url)
        grants = await get_grants(sandbox_url)
    assert set(results) == {"200"}, results
    assert results["200"] > CONNECTIONS * 10
    assert stats["reuse_detected"] == 0
    # Every connection was refreshed along the way (2 s tokens, 30 s of traffic).
    assert stats["refresh_grants"] >= CONNECTIONS * 3
    assert len(grants) == CONNECTIONS
    for grant in grants:
        assert grant["reuse_detected"] == 0, grant
        assert not grant["revoked"], grant
        # 2 s tokens refreshed 1 s before expiry: about one refresh a second while used,
        # and never one per process per rotation.
        assert grant["refreshes"] <= SECONDS * 1.5 + 2, grant
