"""The whole product against the sandbox: authorise, forward, 401 replay, revocation, secrets.

A real proxy (`serve()` on a free port, or `pleo-proxy run` as a child process) in
front of the real sandbox; the authorise page is walked over HTTP as a browser would.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from proxy.config import Config, load_config
from proxy.connect.authorise import read_authorize_url
from proxy.demo import walk_authorisation
from proxy.http.serve import serve
from proxy.store.file import FileStore
from tests.flows import sandbox_config
from tests.processes import (
    PLEO_PROXY,
    free_port,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs

__all__ = ["sandbox"]


@asynccontextmanager
async def running_proxy(
    sandbox: RunningSandbox, state_dir: Path, *, before_expiry: float = 120.0
) -> AsyncIterator[Config]:
    port = free_port()
    redirect = f"http://localhost:{port}/_proxy/callback"
    await set_knobs(sandbox.url, redirect_uris=[redirect])
    config = sandbox_config(
        sandbox.url, state_dir, port=port, redirect_uri=redirect, before_expiry=before_expiry
    )
    stop_event = asyncio.Event()
    listening = asyncio.Event()
    task = asyncio.create_task(
        serve(config, stop=stop_event, on_listening=lambda _: listening.set())
    )
    await asyncio.wait_for(listening.wait(), 10)
    try:
        yield config
    finally:
        stop_event.set()
        await asyncio.wait_for(task, 15)


async def authorise(config: Config) -> str:
    """Walk the one-time page; returns the authorisation code Pleo handed back."""
    url = read_authorize_url(config)
    assert url is not None
    walk = await walk_authorisation(url)
    assert walk.status == 200, walk.page
    return parse_qs(urlsplit(walk.callback_url).query)["code"][0]


def base(config: Config) -> str:
    return f"http://127.0.0.1:{config.listen.port}"


async def test_a_401_for_a_valid_token_is_refreshed_and_replayed_once(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with running_proxy(sandbox, tmp_path) as config, aiohttp.ClientSession() as client:
        await authorise(config)
        body = os.urandom(200_000)
        await set_knobs(sandbox.url, api_401_once=True)
        async with client.post(f"{base(config)}/v1/uploads", data=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        stats = await get_stats(sandbox.url)
        assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        # The sandbox refused the first attempt without reading it: the upload it
        # processed, once, is the replay with the refreshed token.
        assert stats["api_by_path"]["/v1/uploads"] == 2
        assert stats["refresh_grants"] == 1

        big = os.urandom(5 * 1024 * 1024)
        await set_knobs(sandbox.url, api_401_once=True)
        async with client.post(f"{base(config)}/v1/uploads", data=io.BytesIO(big)) as resp:
            assert resp.status == 401
            assert resp.headers["X-Pleo-Proxy-Replay"] == "body-too-large"
        assert (await get_stats(sandbox.url))["api_by_path"]["/v1/uploads"] == 3


async def test_500_concurrent_requests_with_an_expired_token_share_one_refresh(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    # 8 s tokens: the burst is over well before a proactive refresh is due (at half-life,
    # up to a quarter of that margin earlier by the scheduler's jitter), even on a busy
    # machine.
    await set_knobs(sandbox.url, access_ttl=8)
    async with (
        running_proxy(sandbox, tmp_path) as config,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
    ):
        await authorise(config)
        stored = await FileStore.from_config(config).load()
        assert stored is not None
        assert stored.tokens is not None
        # Unused since authorised, so no background refresh: all 500 requests arrive
        # together just after expiry and find the access token expired.
        await asyncio.sleep(max(0.0, stored.tokens.expires_at - time.time()) + 0.05)
        before = await get_stats(sandbox.url)

        async def one() -> int:
            async with client.get(f"{base(config)}/v1/introspect") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(500))), 60)
        after = await get_stats(sandbox.url)
    assert statuses == [200] * 500
    assert after["refresh_grants"] - before["refresh_grants"] == 1
    assert after["reuse_detected"] == 0


async def test_revoked_grant_answers_503_and_reauthorisation_restores_traffic(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with running_proxy(sandbox, tmp_path) as config, aiohttp.ClientSession() as client:
        await authorise(config)
        async with client.get(f"{base(config)}/v1/introspect") as resp:
            assert resp.status == 200
        async with client.post(f"{sandbox.url}/_sandbox/revoke") as resp:
            assert resp.status == 200
        # Within one request: the 401 triggers a refresh, Pleo says invalid_grant.
        async with client.get(f"{base(config)}/v1/introspect") as resp:
            assert resp.status == 503
            error = await resp.json()
        assert error["error"] == "reauthorization_required"
        assert error["authorize_url"] == f"http://localhost:{config.listen.port}/_proxy/authorize"
        async with client.get(f"{base(config)}/_proxy/readyz") as resp:
            assert resp.status == 503
        calls = (await get_stats(sandbox.url))["token_requests"]
        async with client.get(f"{base(config)}/v1/introspect") as resp:
            assert resp.status == 503
        assert (await get_stats(sandbox.url))["token_requests"] == calls  # nothing more sent

        # The authorise page is open again, with a new setup code.
        setup_url = read_authorize_url(config)
        assert setup_url is not None
        async with client.get(setup_url) as resp:
            assert resp.status == 200
        await authorise(config)
        async with client.get(f"{base(config)}/v1/introspect") as resp:
            assert resp.status == 200
        async with client.get(f"{base(config)}/_proxy/readyz") as resp:
            assert resp.status == 200
        async with client.get(f"{base(config)}/_proxy/status") as resp:
            status = await resp.json()
        assert status["state"] == "authorised"
    assert (await get_stats(sandbox.url))["reuse_detected"] == 0


async def test_token_file_and_logs_hold_no_secret(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    redirect = f"http://localhost:{port}/_proxy/callback"
    log_path = tmp_path / "proxy.log"
    with sandbox_process(redirect) as sandbox_url:
        await set_knobs(sandbox_url, access_ttl=2)
        config_file = write_config(
            tmp_path / "c.yaml", sandbox_url=sandbox_url, port=port, state_dir=state
        )
        config = load_config(config_file)
        with log_path.open("wb") as log:
            proc = start_proxy(config_file, log)
            try:
                await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/healthz")
                code = await authorise(config)
                async with aiohttp.ClientSession() as client:
                    deadline = time.monotonic() + 5  # two refreshes at least (2 s tokens)
                    while time.monotonic() < deadline:
                        async with client.get(f"http://127.0.0.1:{port}/v1/introspect") as resp:
                            assert resp.status == 200
                        await asyncio.sleep(0.1)
                stored = await FileStore.from_config(config).load()
            finally:
                stop(proc)
        assert (await get_stats(sandbox_url))["refresh_grants"] >= 2
    assert stored is not None
    assert stored.tokens is not None
    assert stored.tokens.refresh_token is not None
    secrets = [
        code,
        "sandbox-secret",
        stored.tokens.access_token.reveal(),
        stored.tokens.refresh_token.reveal(),
    ]
    logged = log_path.read_bytes()
    assert b"/v1/introspect" in logged  # the log is there, and it was written
    for path in (config.tokens.path, config.tokens.key_file, log_path):
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"a secret is in {path.name}"
    for path in (config.tokens.path, config.tokens.key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_demo_auto_approve_serves_the_sandbox(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*PLEO_PROXY, "demo", "--port", str(port), "--auto-approve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/_proxy/readyz", timeout=30)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/v1/introspect") as resp,
        ):
            assert resp.status == 200
            doc = await resp.json()
        assert doc["data"]["subjectURN"].startswith("urn:pleo:company:")
    finally:
        stop(proc)
        out, _ = proc.communicate(timeout=10)  # also closes the pipe
    printed = out.decode()
    assert "/_proxy/authorize?setup=" in printed
    assert f"curl -s http://127.0.0.1:{port}/v1/introspect" in printed
