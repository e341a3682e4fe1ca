"""sd_notify end to end: `pleo-proxy run` as a child talking to a real datagram socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import PLEO_PROXY, free_port, write_config

BOUND = 20.0


@contextmanager
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(BOUND)
        yield sock, path
    finally:
        sock.close()


def next_states(sock: socket.socket) -> list[str]:
    """The next datagram's assignments other than the watchdog's (blocks up to BOUND)."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        lines = sock.recv(4096).decode().splitlines()
        if lines != ["WATCHDOG=1"]:
            return lines
    raise TimeoutError("no notification")


def _run(config: Path, notify_path: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    return subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "proxy.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=free_port(),
        state_dir=tmp_path / "state",
    )


def _ready_reload_stop(tmp_path: Path, *extra: str) -> None:
    with notify_socket(tmp_path) as (sock, path):
        proc = _run(_config(tmp_path), path, *extra)
        try:
            assert next_states(sock) == ["READY=1"]
            proc.send_signal(signal.SIGHUP)
            assert next_states(sock)[0] == "RELOADING=1"
            assert next_states(sock) == ["READY=1"]
            proc.send_signal(signal.SIGTERM)
            assert next_states(sock) == ["STOPPING=1"]
            assert proc.wait(timeout=BOUND) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_ready_reloading_and_stopping_from_a_running_proxy(tmp_path: Path) -> None:
    _ready_reload_stop(tmp_path)


def test_the_worker_supervisor_speaks_for_its_workers(tmp_path: Path) -> None:
    # Workers must not notify: READY=1 comes once, from the supervisor, after both listen.
    _ready_reload_stop(tmp_path, "--workers", "2")


def test_a_failed_start_is_not_announced_as_ready(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "tokens.key").write_text("not a key")
    with notify_socket(tmp_path) as (sock, path):
        proc = _run(config, path)
        assert proc.wait(timeout=BOUND) == 1
        sock.settimeout(0.2)
        try:
            states = sock.recv(4096).decode().splitlines()
        except TimeoutError:
            states = []
    assert "READY=1" not in states
