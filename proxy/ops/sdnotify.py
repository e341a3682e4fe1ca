"""The systemd service protocol: sd_notify datagrams, the watchdog interval, socket activation.

Owns the wire format of `$NOTIFY_SOCKET` messages and the `$LISTEN_FDS` hand-over, in pure
stdlib (no libsystemd). Must not import the rest of `proxy`, decide when to be ready, or
send anything but the state it is given (never a secret: these lines reach the journal).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

# sd_listen_fds(3): passed descriptors start right after stdin, stdout and stderr.
LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# A datagram per state; a full socket buffer must not stall the event loop.
SEND_TIMEOUT_SECONDS = 1.0


def _socket_address(value: str) -> str | None:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock addresses (systemd 253+) and garbage: not ours to speak


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", ...) to the service manager; False if not sent.

    Never raises on a send error: a notification is advice to systemd, not a reason to
    stop serving.
    """
    env = os.environ if environ is None else environ
    address = _socket_address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def _is_for_us(pid_text: str | None) -> bool:
    """systemd names the process a variable is meant for; a child must not act on it."""
    return pid_text is None or _positive_int(pid_text) == os.getpid()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `WatchdogSec=`), or None if not watched.

    Half the timeout, as sd_watchdog_enabled(3) advises, so one late ping is not fatal.
    """
    env = os.environ if environ is None else environ
    usec = _positive_int(env.get("WATCHDOG_USEC"))
    if usec is None or not _is_for_us(env.get("WATCHDOG_PID")):
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float, *, environ: Mapping[str, str] | None = None) -> None:
    """Send WATCHDOG=1 every `interval` seconds until cancelled.

    The ping is sent from the event loop on purpose: a loop blocked for too long stops
    pinging, and systemd restarts the service.
    """
    while True:
        notify("WATCHDOG=1", environ=environ)
        await asyncio.sleep(interval)


def _adopt(fd: int) -> socket.socket:
    """The passed descriptor as a socket object, close-on-exec as sd_listen_fds(3) sets it."""
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)  # family, type and protocol are read from the descriptor


def listen_fds(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by socket activation (`LISTEN_PID`/`LISTEN_FDS`), else [].

    With the default `environ` (os.environ) the variables are removed afterwards, so a
    child process never mistakes them for its own.
    """
    env = os.environ if environ is None else environ
    count = _positive_int(env.get("LISTEN_FDS"))
    # Unlike WATCHDOG_PID, LISTEN_PID is mandatory: without it the fds are not ours.
    pid = _positive_int(env.get("LISTEN_PID"))
    if environ is None:
        for name in LISTEN_VARIABLES:
            os.environ.pop(name, None)
    if count is None or pid != os.getpid():
        return []
    return [_adopt(fd) for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count)]
