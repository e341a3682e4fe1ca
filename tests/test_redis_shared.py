"""Sidecars sharing one Pleo connection through Redis: real `pleo-proxy run` processes,
each with its own state directory, one redis-server, one key, and the sandbox counting
refresh grants and any reuse of a spent refresh token. The long one: six sidecars, two
hundred concurrent clients, 2 s access tokens, a minute (PLEO_PROXY_REDIS_SIX_SECONDS)."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from proxy.store.crypto import format_key, generate_key, write_private
from tests.flows import authorise_store, traffic_through_proxies
from tests.processes import (
    free_port,
    http_get,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.redis_server import redis_url  # noqa: F401
from tests.sandboxes import get_stats, set_knobs

SHARED_SECONDS = float(os.environ.get("PLEO_PROXY_REDIS_SHARED_SECONDS", "20"))
SIX_SECONDS = float(os.environ.get("PLEO_PROXY_REDIS_SIX_SECONDS", "60"))
SIX_INSTANCES = 6
SIX_CLIENTS = 200
PICKUP_TIMEOUT = 10.0


def _configs(
    tmp_path: Path, sandbox_url: str, redis: str, ports: list[int]
) -> list[tuple[Path, Path]]:
    """(config file, state dir) per instance: separate state dirs, one Redis."""
    out = []
    for index, port in enumerate(ports):
        state_dir = tmp_path / f"state{index}"
        config = write_config(
            tmp_path / f"proxy{index}.yaml",
            sandbox_url=sandbox_url,
            port=port,
            state_dir=state_dir,
            tokens={"store": "redis", "redis_url": redis},
        )
        out.append((config, state_dir))
    return out


async def test_two_sidecars_share_one_connection_through_redis(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One key for every instance, from the environment (what the children inherit).
    monkeypatch.setenv("PLEO_PROXY_KEY", base64.b64encode(generate_key()).decode())
    ports = [free_port(), free_port()]
    with sandbox_process() as sandbox_url:
        await set_knobs(sandbox_url, access_ttl=2)
        instances = _configs(tmp_path, sandbox_url, redis_url, ports)
        await authorise_store(sandbox_url, *instances[0])
        configs = [config for config, _ in instances]
        results = await traffic_through_proxies(configs, ports, SHARED_SECONDS, workers=8)
        stats = await get_stats(sandbox_url)
    assert set(results) == {"200"}, results
    assert results["200"] > 500
    assert stats["reuse_detected"] == 0
    # Access tokens lived 2 s: refreshed all along, by one instance at a time.
    assert SHARED_SECONDS / 2 <= stats["refresh_grants"] <= SHARED_SECONDS * 2
    for _, state_dir in instances:
        assert not (state_dir / "tokens.enc").exists()  # the tokens live in Redis only
        assert not (state_dir / "tokens.key").exists()  # the key came from the environment


@pytest.mark.timeout(SIX_SECONDS + 180)
async def test_six_sidecars_and_two_hundred_clients_share_one_connection(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLEO_PROXY_KEY", base64.b64encode(generate_key()).decode())
    ports = [free_port() for _ in range(SIX_INSTANCES)]
    with sandbox_process() as sandbox_url:
        await set_knobs(sandbox_url, access_ttl=2)
        instances = _configs(tmp_path, sandbox_url, redis_url, ports)
        await authorise_store(sandbox_url, *instances[0])
        configs = [config for config, _ in instances]
        results = await traffic_through_proxies(configs, ports, SIX_SECONDS, workers=SIX_CLIENTS)
        stats = await get_stats(sandbox_url)
    print(f"{SIX_INSTANCES} sidecars, {SIX_CLIENTS} clients, {SIX_SECONDS:g} s: {results} {stats}")
    assert set(results) == {"200"}, results  # zero failed requests
    assert results["200"] > SIX_CLIENTS * 10
    assert stats["reuse_detected"] == 0
    # 2 s tokens refreshed 1 s before expiry: about one refresh a second in all, shared.
    assert SIX_SECONDS / 2 <= stats["refresh_grants"] <= SIX_SECONDS * 2


async def test_an_unauthorised_instance_picks_up_tokens_another_stored(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PLEO_PROXY_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    ports = [free_port(), free_port()]
    with sandbox_process() as sandbox_url:
        instances = _configs(tmp_path, sandbox_url, redis_url, ports)
        # One key file, copied to every instance's state directory.
        key = format_key(generate_key())
        for _, state_dir in instances:
            state_dir.mkdir(mode=0o700)
            write_private(state_dir / "tokens.key", key)
        procs = [start_proxy(config) for config, _ in instances]
        try:
            for port in ports:
                await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/healthz")
                status, _ = await asyncio.to_thread(
                    http_get, f"http://127.0.0.1:{port}/v1/introspect"
                )
                assert status == 503
            # Stored through the first instance's configuration, while both run.
            await authorise_store(sandbox_url, *instances[0])
            for port in ports:
                await asyncio.to_thread(
                    wait_for, f"http://127.0.0.1:{port}/v1/introspect", timeout=PICKUP_TIMEOUT
                )
        finally:
            for proc in procs:
                stop(proc)
        stats = await get_stats(sandbox_url)
    assert stats["reuse_detected"] == 0
