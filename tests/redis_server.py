"""Test support: Debian's `redis-server` on a free loopback port, stopped in `finally`.

Never skipped: a machine without `redis-server` fails the tests that need it (`.ci/run`
installs it). Other test modules use the fixture with
`from tests.redis_server import redis_url  # noqa: F401`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.processes import free_port

START_TIMEOUT = 10.0
PORT_ATTEMPTS = 3  # another process may take the free port before redis-server binds it


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    command: tuple[str, ...] = ()  # how it was started: `restart()` starts it so again
    password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self, *, down_for: float = 0.0) -> None:
        """SIGTERM (Redis writes its AOF and exits), stay down `down_for` s, start again on
        the same port and directory: with `--appendonly yes` the data survives."""
        stop_redis(self)
        time.sleep(down_for)
        self.process = _spawn(self.command)
        if not _wait_for_ping(self):
            stop_redis(self)
            raise AssertionError(f"redis-server did not come back on port {self.port}")


def ping(port: int, *, password: str | None = None, timeout: float = 1.0) -> bool:
    """True when a Redis on `port` answers PING with PONG (raw RESP, no client library)."""
    command = b"PING\r\n" if password is None else f"AUTH {password}\r\nPING\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(command)
            answer = b""
            while b"PONG" not in answer and not answer.startswith(b"-"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                answer += chunk
            return b"+PONG" in answer
    except OSError:
        return False


def _executable() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    return path


def _spawn(command: tuple[str, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_ping(server: RedisServer) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while server.process.poll() is None and time.monotonic() < deadline:
        if ping(server.port, password=server.password):
            return True
        time.sleep(0.02)
    return False


def _start(executable: str, directory: str, *args: str, password: str | None) -> RedisServer:
    port = free_port()
    # Later options win: `args` may turn persistence on (`--appendonly yes`).
    command: tuple[str, ...] = (executable, "--port", str(port), "--bind", "127.0.0.1")
    command += ("--save", "")
    command += ("--appendonly", "no", "--daemonize", "no", "--dir", directory, *args)
    server = RedisServer(port, _spawn(command), command, password)
    if _wait_for_ping(server):
        return server
    stop_redis(server)
    raise RuntimeError(f"redis-server did not answer PING on port {port}")


def stop_redis(server: RedisServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


@contextmanager
def running_redis(*args: str, password: str | None = None) -> Iterator[RedisServer]:
    """A fresh redis-server (extra `args` appended; `password` if it sets requirepass)."""
    executable = _executable()
    with tempfile.TemporaryDirectory(prefix="pleo-redis-") as directory:
        error: RuntimeError | None = None
        for _ in range(PORT_ATTEMPTS):
            try:
                server = _start(executable, directory, *args, password=password)
                break
            except RuntimeError as exc:
                error = exc
        else:
            raise AssertionError(f"could not start redis-server: {error}")
        try:
            yield server
        finally:
            stop_redis(server)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of a fresh, empty redis-server, stopped after the test."""
    with running_redis() as server:
        yield server.url
