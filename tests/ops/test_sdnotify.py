"""sd_notify, watchdog and socket activation against real AF_UNIX and TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ops import sdnotify

RECEIVE_TIMEOUT = 5.0
CHILD_TIMEOUT = 20.0


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, as systemd's notify socket is."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield sock


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_path_socket_receives_each_state_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with notify_socket(path) as sock:
        env = {"NOTIFY_SOCKET": path}
        assert sdnotify.notify("READY=1", environ=env)
        assert sdnotify.notify("STOPPING=1", environ=env)
        assert [received(sock), received(sock)] == [b"READY=1", b"STOPPING=1"]


def test_abstract_socket_receives_state() -> None:
    name = f"pleo-proxy-test-{uuid.uuid4().hex}"
    with notify_socket("\0" + name) as sock:
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == b"READY=1"


def test_default_environ_is_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with notify_socket(path) as sock:
        assert sdnotify.notify("STATUS=serving")
        assert received(sock) == b"STATUS=serving"


def test_unset_socket_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", environ={}) is False


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_unusable_socket_value_is_false(value: str) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_send_error_is_false_not_raised(tmp_path: Path) -> None:
    # Nobody listens there: sendto fails with ENOENT, which must not reach the caller.
    env = {"NOTIFY_SOCKET": str(tmp_path / "absent")}
    assert sdnotify.notify("READY=1", environ=env) is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(environ) == expected


def test_watchdog_interval_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 2.0


async def test_watchdog_loop_pings_until_cancelled(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with notify_socket(path) as sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(sdnotify.watchdog_loop(0.01, environ={"NOTIFY_SOCKET": path}))
        try:
            pings = [
                await asyncio.wait_for(loop.sock_recv(sock, 64), RECEIVE_TIMEOUT) for _ in range(3)
            ]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert pings == [b"WATCHDOG=1"] * 3
        assert task.cancelled()


# The child adopts what systemd would pass (fd 3) and answers one connection with the
# family it detected, proving the socket object is usable and not just a number.
CHILD = """
import os, sys
from proxy.ops import sdnotify
sockets = sdnotify.listen_fds()
leftover = [n for n in sdnotify.LISTEN_VARIABLES if n in os.environ]
conn, _ = sockets[0].accept()
with conn:
    conn.sendall(f"{len(sockets)} {sockets[0].family.name} {leftover}".encode())
for s in sockets:
    s.close()
"""


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}


def _spawn_child(listener: socket.socket) -> subprocess.Popen[bytes]:
    """Start the child with `listener` at fd 3 and LISTEN_PID/LISTEN_FDS, as systemd does.

    systemd writes LISTEN_PID between fork and exec, when the child's pid is known; the
    child's prologue does the same (and moves the passed fd to 3) before running CHILD.
    """
    fd = listener.fileno()
    prologue = (
        f"import os; os.dup2({fd}, {sdnotify.LISTEN_FDS_START}); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prologue + CHILD],
        env=_child_env(),
        pass_fds=(fd,),
        stdout=subprocess.DEVNULL,
    )


def _listener(family: str, tmp_path: Path) -> tuple[socket.socket, str | tuple[str, int]]:
    if family == "AF_UNIX":
        path = str(tmp_path / "listen")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(path)
        unix.listen()
        return unix, path
    tcp = socket.create_server(("127.0.0.1", 0))
    return tcp, tcp.getsockname()


@pytest.mark.parametrize("family", ["AF_INET", "AF_UNIX"])
def test_listen_fds_adopts_a_passed_listening_socket(family: str, tmp_path: Path) -> None:
    listener, address = _listener(family, tmp_path)
    with listener:
        child = _spawn_child(listener)
    try:
        with socket.socket(listener.family, socket.SOCK_STREAM) as client:
            client.settimeout(CHILD_TIMEOUT)
            client.connect(address)
            answer = client.recv(256)
        assert child.wait(CHILD_TIMEOUT) == 0
    finally:
        child.kill()
        child.wait(CHILD_TIMEOUT)
    assert answer == f"1 {family} []".encode()


def test_listen_fds_for_another_pid_is_empty() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert sdnotify.listen_fds(env) == []


@pytest.mark.parametrize(
    "environ",
    [{}, {"LISTEN_FDS": "1"}, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}],
)
def test_listen_fds_without_sockets_is_empty(environ: dict[str, str]) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    assert sdnotify.listen_fds(env) == []


def test_listen_fds_unsets_variables_meant_for_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "web")
    assert sdnotify.listen_fds() == []
    assert not any(name in os.environ for name in sdnotify.LISTEN_VARIABLES)
