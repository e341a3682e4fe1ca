"""Fault injection: the token endpoint, the upstream and the disk misbehave; nothing is lost.

Token-endpoint faults use the sandbox's knobs (and a dead port); upstream faults a raw
asyncio server that resets, stalls or speaks broken HTTP; disk faults a real proxy
process whose file-size limit (RLIMIT_FSIZE, set from outside with prlimit, on the proxy
and on its refresh helper, which writes the tokens) or state directory permissions change
while it runs. For each: the client sees success or a
clear JSON error, and the stored refresh token still works afterwards (or the state
says why not). SIGKILL during a write: tests/store/test_file.py
(`test_sigkill_during_saves_never_leaves_a_torn_file`).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config, Timeouts, load_config
from proxy.http.serve import serve
from proxy.lifecycle import oauth
from proxy.store.crypto import format_key, generate_key
from proxy.store.file import FileStore
from proxy.tokenset import StoredState, TokenSet
from tests.flows import grant_tokens, sandbox_config
from tests.processes import children, free_port, import_tokens, write_config
from tests.proxyproc import RecordingCredentials, proxy_config, run_proxy_app
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs
from tests.store.test_file import without_dac_override
from tests.upstreams import dead_port

__all__ = ["sandbox"]

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)
FAST_TOKEN_TIMEOUTS = Timeouts(connect=1.0, read=10.0, token_request=0.5, shutdown=5.0)


# -- helpers ---------------------------------------------------------------------------


async def seed(config: Config, *, now: float | None = None) -> TokenSet:
    """Real tokens from the sandbox, stored where the proxy will find them."""
    tokens = await grant_tokens(config, now=now or time.time())
    store = FileStore.from_config(config)
    await store.save(StoredState(tokens=tokens, obtained_at=time.time()))
    await store.close()
    return tokens


async def stored(config: Config) -> StoredState:
    store = FileStore.from_config(config)
    try:
        state = await store.load()
    finally:
        await store.close()
    assert state is not None
    return state


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[str]:
    """`serve(config)` in this process on a free port; yields its base URL."""
    port = free_port()
    config = replace(config, listen=replace(config.listen, port=port))
    stop = asyncio.Event()
    listening = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop, on_listening=lambda _: listening.set()))
    await asyncio.wait_for(listening.wait(), 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def get(url: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
        client.get(url) as response,
    ):
        body = await response.read()
        is_json = response.content_type == "application/json"
        return response.status, (await response.json() if is_json else body)


async def assert_refresh_token_still_works(sandbox: RunningSandbox, base: str) -> None:
    """A forced refresh (a 401 from the API) succeeds with what the proxy holds."""
    before = await get_stats(sandbox.url)
    await set_knobs(sandbox.url, api_401_once=True)
    status, _ = await get(f"{base}/v1/introspect")
    assert status == 200
    after = await get_stats(sandbox.url)
    assert after["refresh_grants"] == before["refresh_grants"] + 1
    assert after["reuse_detected"] == 0


# -- the token endpoint ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["500", "503", "429", "garbage", "reset", "timeout"])
async def test_token_endpoint_failing_gives_json_503_and_keeps_the_refresh_token(
    mode: str, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = replace(sandbox_config(sandbox.url, tmp_path), timeouts=FAST_TOKEN_TIMEOUTS)
    await set_knobs(sandbox.url, access_ttl=1)
    tokens = await seed(config)
    await set_knobs(sandbox.url, access_ttl=900, token_failures=100, token_failure_mode=mode)
    await asyncio.sleep(max(0.0, tokens.expires_at - time.time()) + 0.1)
    async with serving(config) as base:
        status, body = await get(f"{base}/v1/introspect")
        assert status == 503
        assert body["error"] == "token_endpoint_unavailable"
        assert set(body) >= {"error", "detail"}
        assert (await stored(config)).tokens == tokens  # the refresh token was not spent
        await set_knobs(sandbox.url, token_failures=0)
        status, _ = await get(f"{base}/v1/introspect")
        assert status == 200
        _, state = await get(f"{base}/_proxy/status")
        assert state["state"] == "authorised"
    stats = await get_stats(sandbox.url)
    assert stats["reuse_detected"] == 0
    assert stats["refresh_grants"] == 1


async def test_token_endpoint_down_keeps_the_refresh_token(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    good = sandbox_config(sandbox.url, tmp_path)
    await set_knobs(sandbox.url, access_ttl=1)
    tokens = await seed(good)
    await asyncio.sleep(max(0.0, tokens.expires_at - time.time()) + 0.1)
    with dead_port() as port:
        pleo = replace(good.pleo, token_url=f"http://127.0.0.1:{port}/oauth/token")
        async with serving(replace(good, pleo=pleo, timeouts=FAST_TOKEN_TIMEOUTS)) as base:
            status, body = await get(f"{base}/v1/introspect")
            assert (status, body["error"]) == (503, "token_endpoint_unavailable")
    state = await stored(good)
    assert state.tokens == tokens
    assert state.last_refresh_outcome == "transient"
    assert state.refresh_started_at is None
    # The refresh token the file holds is still good at Pleo.
    assert tokens.refresh_token is not None
    async with aiohttp.ClientSession() as session:
        fresh = await oauth.refresh_tokens(
            session, good.pleo, refresh_token=tokens.refresh_token, timeout=5, now=time.time()
        )
    assert fresh.access_token != tokens.access_token


async def test_a_slow_token_endpoint_within_the_timeout_succeeds(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = sandbox_config(sandbox.url, tmp_path)
    await set_knobs(sandbox.url, access_ttl=1)
    tokens = await seed(config)
    await set_knobs(sandbox.url, access_ttl=900, latency=1.0)
    await asyncio.sleep(max(0.0, tokens.expires_at - time.time()) + 0.1)
    async with serving(config) as base:
        started = time.monotonic()
        status, _ = await get(f"{base}/v1/introspect")
        assert status == 200
        assert time.monotonic() - started >= 1.0
    assert (await get_stats(sandbox.url))["refresh_grants"] == 1


async def test_a_token_answer_without_refresh_token_ends_cleanly(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """The sandbox rotates but leaves the new refresh token out of its answer.

    The proxy keeps the old one (RFC 6749 §6 allows an answer without one); the next
    refresh presents it, the sandbox sees a spent token and ends the grant. The client
    gets success first, then a clear 503 reauthorization_required, and the proxy
    stops asking Pleo (no loop).
    """
    config = sandbox_config(sandbox.url, tmp_path)
    await seed(config)
    async with serving(config) as base:
        await set_knobs(
            sandbox.url, token_failures=1, token_failure_mode="no_refresh_token", api_401_once=True
        )
        assert (await get(f"{base}/v1/introspect"))[0] == 200
        await set_knobs(sandbox.url, api_401_once=True)
        status, body = await get(f"{base}/v1/introspect")
        assert (status, body["error"]) == (503, "reauthorization_required")
        calls = (await get_stats(sandbox.url))["token_requests"]
        assert (await get(f"{base}/v1/introspect"))[0] == 503
        assert (await get_stats(sandbox.url))["token_requests"] == calls
        _, state = await get(f"{base}/_proxy/status")
        assert state["state"] == "reauthorization_required"
    assert (await stored(config)).reauth_reason


# -- the upstream ----------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[str]:
    """An upstream stand-in that reads a request head, then runs `script` on the socket."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing upstream would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def reset_mid_body(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.1)
    reset(writer)


async def reset_mid_chunked_body(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.1)
    reset(writer)


async def stall_mid_body(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(30)


async def stall_before_answer(_: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


def answer(data: bytes) -> Script:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.2)

    return script


async def reset_at_once(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reset(writer)


@pytest.mark.parametrize(
    ("script", "status", "code"),
    [
        (stall_before_answer, 504, "upstream_timeout"),
        (reset_at_once, 502, "upstream_unreachable"),
        (answer(b"NOT HTTP AT ALL\r\n\r\n"), 502, "upstream_unreachable"),
        (answer(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n"), 502, "upstream_unreachable"),
        (answer(b"HTTP/1.1 2000 OK\r\n\r\n"), 502, "upstream_unreachable"),
        (answer(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n"), 502, "upstream_unreachable"),
    ],
    ids=["stall-before-answer", "reset", "not-http", "bad-length", "bad-status", "nul-header"],
)
async def test_an_upstream_failing_before_its_answer_gives_json(
    script: Script, status: int, code: str
) -> None:
    async with raw_upstream(script) as url:
        config = proxy_config(url, timeouts=Timeouts(connect=1.0, read=1.0, shutdown=2.0))
        async with run_proxy_app(config, RecordingCredentials()) as proxy:
            got, body = await get(str(proxy.make_url("/v1/x")))
    assert got == status
    assert body["error"] == code
    assert body["detail"]


@pytest.mark.parametrize(
    "script",
    [reset_mid_body, reset_mid_chunked_body, stall_mid_body],
    ids=["reset-content-length", "reset-chunked", "stall"],
)
async def test_an_upstream_failing_mid_body_never_looks_complete(script: Script) -> None:
    """Status and headers are gone already: the client must see a broken body, not a short one."""
    async with raw_upstream(script) as url:
        config = proxy_config(url, timeouts=Timeouts(connect=1.0, read=1.0, shutdown=2.0))
        async with (
            run_proxy_app(config, RecordingCredentials()) as proxy,
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
            client.get(proxy.make_url("/v1/x")) as response,
        ):
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


# -- the disk, in a real proxy process ---------------------------------------------------

CHILD = """
import signal, sys
# A write past RLIMIT_FSIZE sends SIGXFSZ, which would kill the process; ignored, the
# write fails with EFBIG instead, which is what a full disk (ENOSPC) looks like to us.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from proxy.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


@asynccontextmanager
async def proxy_process(
    sandbox: RunningSandbox, tmp_path: Path, *, prefix: tuple[str, ...] = ()
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Config]]:
    """`pleo-proxy run` in a child (under `prefix`), with tokens imported; SIGTERM at the end."""
    port = free_port()
    state_dir = tmp_path / "state"
    config_file = write_config(
        tmp_path / "config.yaml", sandbox_url=sandbox.url, port=port, state_dir=state_dir
    )
    config = load_config(config_file)
    tokens = await grant_tokens(config, now=time.time())
    await asyncio.to_thread(import_tokens, config_file, tokens)
    child = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-c",
        CHILD,
        str(config_file),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base)
        yield child, base, config
    finally:
        if child.returncode is None:
            child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                child.kill()
                await child.wait()


async def wait_healthy(base: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                if (await get(f"{base}/_proxy/healthz"))[0] == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


@contextmanager
def file_size_limit(pid: int, limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE on the proxy `pid` and its refresh helper: a full disk for both."""
    pids = [pid, *children(pid)]
    saved = [(p, resource.prlimit(p, resource.RLIMIT_FSIZE)) for p in pids]
    for p, (_, hard) in saved:
        resource.prlimit(p, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        for p, limits in saved:
            resource.prlimit(p, resource.RLIMIT_FSIZE, limits)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


async def refresh_fails_with_store_error(
    sandbox: RunningSandbox, base: str, config: Config
) -> None:
    before = config.tokens.path.read_bytes()
    stats = await get_stats(sandbox.url)
    await set_knobs(sandbox.url, api_401_once=True)
    status, body = await get(f"{base}/v1/introspect")
    assert (status, body["error"]) == (503, "store_error")
    assert "detail" in body
    # The in-progress mark could not be written, so Pleo never saw the refresh token.
    assert (await get_stats(sandbox.url))["token_requests"] == stats["token_requests"]
    assert config.tokens.path.read_bytes() == before
    assert temp_files(config.tokens.state_dir) == []


async def test_disk_full_during_a_token_write(sandbox: RunningSandbox, tmp_path: Path) -> None:
    async with proxy_process(sandbox, tmp_path) as (child, base, config):
        assert (await get(f"{base}/v1/introspect"))[0] == 200
        with file_size_limit(child.pid, 64):
            await refresh_fails_with_store_error(sandbox, base, config)
        await assert_refresh_token_still_works(sandbox, base)


async def test_read_only_state_dir_during_a_token_write(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    prefix = without_dac_override()
    async with proxy_process(sandbox, tmp_path, prefix=prefix) as (_, base, config):
        assert (await get(f"{base}/v1/introspect"))[0] == 200
        config.tokens.state_dir.chmod(0o500)
        try:
            await refresh_fails_with_store_error(sandbox, base, config)
        finally:
            config.tokens.state_dir.chmod(0o700)
        await assert_refresh_token_still_works(sandbox, base)


# -- the store key at start ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "wrong"])
async def test_a_missing_or_wrong_store_key_stops_the_start_with_a_clear_error(
    damage: str, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    port = free_port()
    config_file = write_config(
        tmp_path / "config.yaml", sandbox_url=sandbox.url, port=port, state_dir=tmp_path / "s"
    )
    config = load_config(config_file)
    await seed(config)
    before = config.tokens.path.read_bytes()
    if damage == "missing":
        config.tokens.key_file.unlink()
    else:
        config.tokens.key_file.write_bytes(format_key(generate_key()))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode not in (0, None)
    text = (out + err).decode()
    assert "Traceback" not in text
    assert "key" in text.lower()
    assert config.tokens.path.read_bytes() == before  # never overwritten under a new key
