"""Several worker processes on one port: start them, pass signals on, end with them.

Each worker is `pleo-proxy run --worker` (its own app, its own listener with
SO_REUSEPORT, the kernel spreading connections); they share tokens through the store's
lock, as separate proxies do. The supervisor starts workers one at a time, each once
the previous one listens (so a start-up failure is reported once, by the first worker),
forwards SIGTERM/SIGINT/SIGHUP, speaks sd_notify for the group, and exits when the
workers have exited, and after them their refresh helpers: it is their subreaper, so a
killed worker's helper finishes its exchange before the group (or, as PID 1, the
container) ends. It restarts none. Must not build an app or touch the store.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from proxy.ops import sdnotify

READY_FD_VARIABLE = "PLEO_PROXY_READY_FD"
READY_LINE = b"ready\n"
START_TIMEOUT = 60.0
POLL_SECONDS = 0.1
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
# How long the helpers of exited workers are waited for when `supervise` is not told.
DEFAULT_LINGER = 25.0
# Service-manager variables belong to the supervisor: workers must not answer systemd.
PARENT_ONLY_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    *sdnotify.LISTEN_VARIABLES,
)


def announce_ready() -> None:
    """In a worker: tell the supervisor that this worker listens (no-op otherwise)."""
    fd_text = os.environ.pop(READY_FD_VARIABLE, None)
    if fd_text is None or not fd_text.isdigit():
        return
    try:
        os.write(int(fd_text), READY_LINE)
        os.close(int(fd_text))
    except OSError:
        pass  # the supervisor has gone; the worker serves on regardless


def become_subreaper() -> bool:
    """Adopt orphaned descendants (a killed worker's refresh helper), so they can be waited
    for. Linux only; PID 1 of a PID namespace (a container) adopts them anyway."""
    import ctypes  # only the supervisor needs it; a serving process never loads it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class Supervisor:
    """Runs `count` workers of `worker_args` and relays signals to them.

    `linger`: how long, once the workers have exited, their helpers are waited for.
    """

    def __init__(
        self, worker_args: Sequence[str], count: int, *, linger: float = DEFAULT_LINGER
    ) -> None:
        self._args = list(worker_args)
        self._count = count
        self._linger = linger
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stopping = False

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        become_subreaper()
        try:
            if not self._start_all():
                self._signal_all(signal.SIGTERM)
                self._wait_all()
                return 1
            sdnotify.notify("READY=1")
            return self._watch()
        finally:
            self._wait_orphans()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- start ---------------------------------------------------------------------

    def _start_all(self) -> bool:
        # all() stops at the first failure: no further worker is started after it.
        return all(not self._stopping and self._start_one() for _ in range(self._count))

    def _start_one(self) -> bool:
        """Start a worker and wait until it listens; False if it exited or hung."""
        read_end, write_end = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in PARENT_ONLY_VARIABLES}
        env[READY_FD_VARIABLE] = str(write_end)
        try:
            worker = subprocess.Popen(self._args, env=env, pass_fds=(write_end,))  # noqa: S603
        finally:
            os.close(write_end)
        self._workers.append(worker)
        try:
            return self._await_ready(read_end, worker)
        finally:
            os.close(read_end)

    def _await_ready(self, read_end: int, worker: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            readable, _, _ = select.select([read_end], [], [], POLL_SECONDS)
            if readable:
                # The ready line, or EOF because the worker exited before listening.
                return os.read(read_end, len(READY_LINE)) == READY_LINE
            if worker.poll() is not None:
                return False
        print("error: a worker did not start listening in time", file=sys.stderr)
        return False

    # -- run -----------------------------------------------------------------------

    def _watch(self) -> int:
        """Until the first worker exits; then stop the others and wait for them."""
        interval = sdnotify.watchdog_interval()
        last_ping = 0.0
        while all(w.poll() is None for w in self._workers):
            if interval and time.monotonic() - last_ping >= interval:
                sdnotify.notify("WATCHDOG=1")
                last_ping = time.monotonic()
            time.sleep(POLL_SECONDS)
        stopped_by_us = self._stopping
        if not stopped_by_us:
            # A worker ended on its own: the group ends with it (nothing is restarted).
            sdnotify.notify("STOPPING=1")
            self._stopping = True
            self._signal_all(signal.SIGTERM)
        codes = self._wait_all()
        return 0 if stopped_by_us and all(code == 0 for code in codes) else 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            self._signal_all(signal.SIGHUP)
            sdnotify.notify("READY=1")
            return
        if not self._stopping:
            sdnotify.notify("STOPPING=1")
        self._stopping = True
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def _wait_all(self) -> list[int]:
        return [worker.wait() for worker in self._workers]

    def _wait_orphans(self) -> None:
        """Reap what the workers left (refresh helpers finishing an exchange) for up to
        `linger` seconds. Exiting first would, as a container's PID 1, kill them."""
        deadline = time.monotonic() + self._linger
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # none left
            if pid == 0:
                if time.monotonic() >= deadline:
                    print("error: a refresh helper is still running; exiting", file=sys.stderr)
                    return
                time.sleep(POLL_SECONDS)


def supervise(
    config_path: Path, count: int, *, log_format: str | None, linger: float = DEFAULT_LINGER
) -> int:
    """Run `count` workers for `config_path`; the exit code for `pleo-proxy run`."""
    args = [sys.executable, "-m", "proxy", "run", "--config", str(config_path), "--worker"]
    if log_format is not None:
        args += ["--log-format", log_format]
    return Supervisor(args, count, linger=linger).run()
