"""Test support: the sandbox and proxies as real child processes (`pleo-proxy ...`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from proxy.tokenset import TokenSet

PLEO_PROXY = [sys.executable, "-m", "proxy"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def children(pid: int) -> list[int]:
    """The direct children of process `pid` (the proxy's: its refresh helper), whichever
    of its threads started them (the kernel lists children per thread)."""
    found: list[int] = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in children_file.read_text().split()]
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return sorted(found)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking GET that returns (status, body) for any status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_for(url: str, *, status: int = 200, timeout: float = 20.0) -> None:
    """Poll `url` until it answers `status` (an observable state, not a log line)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            code, _ = http_get(url, timeout=2)
            if code == status:
                return
            last = code
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s (last: {last})")


def write_config(
    path: Path, *, sandbox_url: str, port: int, state_dir: Path, **overrides: Any
) -> Path:
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {
            "environment": "sandbox",
            "api_url": sandbox_url,
            "authorize_url": f"{sandbox_url}/oauth/authorize",
            "token_url": f"{sandbox_url}/oauth/token",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "scopes": ["users:read", "test:test"],
            "redirect_uri": f"http://localhost:{port}/_proxy/callback",
        },
        "tokens": {
            "path": str(state_dir / "tokens.enc"),
            "key_file": str(state_dir / "tokens.key"),
        },
        "timeouts": {"token_request": 5, "connect": 2, "shutdown": 5},
    }
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    return path


@contextmanager
def sandbox_process(*redirect_uris: str) -> Iterator[str]:
    """`pleo-proxy sandbox` on a free port; yields its base URL."""
    port = free_port()
    args = [*PLEO_PROXY, "sandbox", "--port", str(port)]
    for uri in redirect_uris:
        args += ["--redirect-uri", uri]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/_sandbox/stats")
        yield url
    finally:
        stop(proc)


def start_proxy(config: Path, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config), "--log-format", "json"],
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def import_tokens(config: Path, tokens: TokenSet) -> None:
    doc = {
        "access_token": tokens.access_token.reveal(),
        "refresh_token": tokens.refresh_token.reveal() if tokens.refresh_token else None,
        "expires_in": max(1, int(tokens.expires_at - time.time())),
        "token_type": "Bearer",
        "scope": " ".join(tokens.scopes),
    }
    done = subprocess.run(
        [*PLEO_PROXY, "import-tokens", "--config", str(config)],
        input=json.dumps(doc).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()


def cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [*PLEO_PROXY, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()
