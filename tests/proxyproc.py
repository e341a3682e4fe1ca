"""Test support: run the proxy under test, in this process or in a child process.

`run_proxy_app()` serves `build_app()` on a loopback port 0 (aiohttp TestServer);
`run_served()` runs the real `serve()` (every listener, TLS, the start-up checks).
`run_child()` starts `python -m <module>` that prints `LISTENING <port>` (the proxy:
`python -m tests.proxyproc <config-json>`; the bulk upstream: `tests.upstreams`) and
reads its peak RSS from /proc. `RecordingCredentials` is a credential-source stand-in
that records every call (it stands in for the token manager, not for our own code).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.config import Config, Listen, Pleo, Refresh, Timeouts, TokensConfig
from proxy.http.app import build_app
from proxy.http.dispatch import install_shortcut
from proxy.http.serve import serve
from proxy.lifecycle.credentials import CredentialSource
from proxy.secret import Secret

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass
class RecordingCredentials:
    """Hands out `Bearer <tokens[0]>`; `on_rejected` moves to the next token, if any."""

    tokens: list[str] = field(default_factory=lambda: ["token-1", "token-2"])
    renew: bool = True
    authorization_calls: list[bool] = field(default_factory=list)  # the `replayable` flags
    rejected: list[str] = field(default_factory=list)
    # What another process stored meanwhile (`stored_since`); None: nothing newer.
    stored: str | None = None
    stored_since_calls: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.authorization_calls) + len(self.rejected)

    async def authorization(self, *, replayable: bool = True) -> Secret:
        self.authorization_calls.append(replayable)
        return Secret(f"Bearer {self.tokens[0]}")

    async def stored_since(self, sent: Secret) -> Secret | None:
        self.stored_since_calls.append(sent.reveal())
        if self.stored is None or f"Bearer {self.stored}" == sent.reveal():
            return None
        return Secret(f"Bearer {self.stored}")

    async def on_rejected(self, sent: Secret) -> Secret | None:
        self.rejected.append(sent.reveal())
        if not self.renew or len(self.tokens) < 2:
            return None
        self.tokens.pop(0)
        return Secret(f"Bearer {self.tokens[0]}")


def _temp_tokens() -> TokensConfig:
    state = Path(tempfile.mkdtemp(prefix="pleo-proxy-test-"))
    return TokensConfig(path=state / "tokens.enc", key_file=state / "tokens.key")


def proxy_config(api_url: str, **overrides: Any) -> Config:
    """A config for tests: loopback, port 0, the given upstream; sections overridable."""
    sections: dict[str, Any] = {
        "listen": Listen(host="127.0.0.1", port=0),
        "pleo": Pleo(api_url=api_url),
        "refresh": Refresh(),
        "timeouts": Timeouts(connect=5.0, read=10.0, shutdown=5.0),
        # Never the default (relative to the working directory): a fresh temp dir.
        "tokens": _temp_tokens(),
    }
    sections.update(overrides)
    return Config(**sections)


@asynccontextmanager
async def run_proxy_app(
    config: Config, credentials: CredentialSource | None = None
) -> AsyncIterator[TestServer]:
    """`build_app(config)` on 127.0.0.1 port 0, cancelling handlers as `serve()` does."""
    server = TestServer(
        build_app(config, credentials=credentials),
        host="127.0.0.1",
        port=0,
        handler_cancellation=True,
        auto_decompress=False,  # as runner_options: bodies are relayed as they came
    )
    await server.start_server()
    assert server.runner is not None
    install_shortcut(server.runner)  # as serve() does; no connection was accepted yet
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def run_served(
    config: Config, credentials: CredentialSource | None = None
) -> AsyncIterator[int]:
    """The real `serve(config)` (every listener, TLS) in a task; yields the main port."""
    stop = asyncio.Event()
    ports: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task: asyncio.Future[None] = asyncio.ensure_future(
        serve(
            config,
            credentials=credentials,
            stop=stop,
            on_listening=lambda addresses: ports.set_result(addresses[0][1]),
        )
    )
    try:
        waiting: set[asyncio.Future[Any]] = {task, ports}
        done, _ = await asyncio.wait(waiting, timeout=20, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # raises why it did not start
        assert ports in done, "the proxy did not start listening"
        yield ports.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


@dataclass
class Child:
    process: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> int:
        """SIGTERM, wait (kill after STOP_TIMEOUT); the exit code (negative: killed)."""
        return await _stop(self.process)

    def peak_rss_bytes(self) -> int:
        """VmHWM: the child's peak resident set size so far."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


@asynccontextmanager
async def run_child(module: str, *args: str) -> AsyncIterator[Child]:
    """Run `python -m module args…` until it prints `LISTENING <port>`; SIGTERM on exit."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        word, _, port = line.decode().partition(" ")
        assert word == "LISTENING", f"{module} did not start: {line!r}"
        yield Child(process, int(port))
    finally:
        await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
    return await process.wait()


@dataclass(frozen=True)
class RawResponse:
    status: int
    head: bytes
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_http(port: int, data: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send `data` as it is (no client library in between); read one response.

    The body is read by Content-Length when there is one (a server may linger on a
    connection whose request body it never read), else until the server closes; send
    `Connection: close`.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
            status = int(head.split(b" ", 2)[1])
            # Bodyless answers: read to EOF (Connection: close), so stray bytes would show.
            bodyless = data.startswith(b"HEAD ") or status in (204, 304)
            length = None if bodyless else _content_length(head)
            body = await (reader.readexactly(length) if length is not None else reader.read())
    finally:
        writer.close()
        await writer.wait_closed()
    return RawResponse(status, head, body)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


async def metric_value(session: aiohttp.ClientSession, base_url: str, sample: str) -> float:
    """One sample of the proxy's `/_proxy/metrics`, e.g. `'x_total{reason="rate"}'`."""
    async with session.get(f"{base_url}/_proxy/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample} in the metrics")


def child_config_json(api_url: str, *, api_key: str) -> str:
    return json.dumps({"api_url": api_url, "api_key": api_key})


def _child_config(raw: str) -> Config:
    data = json.loads(raw)
    return proxy_config(
        data["api_url"], pleo=Pleo(api_url=data["api_url"], api_key=Secret(data["api_key"]))
    )


def _announce(addresses: list[tuple[str, int]]) -> None:
    print(f"LISTENING {addresses[0][1]}", flush=True)


if __name__ == "__main__":
    # The proxy child: serve() until SIGTERM, which it handles gracefully itself.
    asyncio.run(serve(_child_config(sys.argv[1]), on_listening=_announce))
