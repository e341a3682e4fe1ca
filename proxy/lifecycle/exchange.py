"""The proxy's side of the refresh helper (proxy/lifecycle/exchanger.py).

`Exchanger` starts one helper for the whole process, detached: its own session (a SIGKILL
of the proxy, or of the proxy's process group, does not reach it), no descriptor but its
end of a socketpair, and a minimal environment; the client secret and the key source go
over the socket. It asks the helper for refreshes (`remote.RemoteSequence`), and tells it
when a request came to wait for one. Must not lock the store, call Pleo, or log a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.lifecycle import wire
from proxy.lifecycle.limiter import Priority
from proxy.lifecycle.rules import Wanted
from proxy.ops.logs import LEVELS, JsonFormatter
from proxy.store.crypto import ENV_KEY

log = logging.getLogger("proxy.tokens")

HELPER_MODULE = "proxy.lifecycle.exchanger"
START_TIMEOUT = 30.0  # a Python start and a few imports; generous for a loaded machine
# After a failed start, refresh in this process for this long before trying again.
RESTART_PAUSE = 30.0
# An answer comes within the lock wait plus one token request plus two writes; past
# this (a hung helper) the refresh counts as failed and the manager's loop retries.
ANSWER_MARGIN = 30.0
# All the helper gets of the environment: how to run Python, the locale, TLS trust. Other
# variables may hold secrets (`${ENV}` in the config); what it needs comes over the socket.
INHERITED_VARIABLES = frozenset(
    {"PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LANG", "LC_ALL"}
    | {"LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR"}
)
KEY_VARIABLES = (ENV_KEY, "CREDENTIALS_DIRECTORY")  # where the store key is looked up


class HelperUnavailable(Exception):
    """No helper could be started: refresh in this process."""


class HelperLost(Exception):
    """The helper stopped (or hung) before it answered: the refresh's outcome is unknown."""


def helper_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name in INHERITED_VARIABLES}


def log_settings() -> tuple[str, str]:
    """This process's log level and format, for the helper to log the same way."""
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return (level if level in LEVELS else "info"), ("json" if json_lines else "text")


class _Link:
    """One running helper: its process, this side of the socket, the requests in flight."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[wire.Answer]] = {}
        self._listener: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._listener is not None and not self._listener.done()

    async def hello(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """The helper's first frame ("ready", or why not); then answers are listened for."""
        frame = await asyncio.wait_for(wire.receive(self._reader), timeout)
        if frame is None:
            return {"ready": False, "error": "it exited"}
        if frame.get("ready") is True:
            self._listener = asyncio.create_task(self._listen(), name="refresh-helper-answers")
        return frame

    async def ask(self, request: wire.Request, *, timeout: float) -> wire.Answer:  # noqa: ASYNC109
        future = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        try:
            await wire.send(self._writer, wire.request_doc(request))
            return await asyncio.wait_for(future, timeout)
        except ConnectionError:
            raise HelperLost("the refresh helper has stopped") from None
        except TimeoutError:
            raise HelperLost(f"the refresh helper did not answer within {timeout:g}s") from None
        finally:
            self._pending.pop(request.id, None)

    def next_id(self) -> int:
        return next(self._ids)

    def post(self, doc: dict[str, Any]) -> None:
        """A frame that needs no answer."""
        with contextlib.suppress(ConnectionError):
            wire.post(self._writer, doc)

    async def _listen(self) -> None:
        try:
            while (frame := await wire.receive(self._reader)) is not None:
                answer = wire.parse_answer(frame)
                future = self._pending.get(answer.id)
                if future is not None and not future.done():
                    future.set_result(answer)
        except (wire.WireError, ConnectionError) as exc:
            log.error("the refresh helper's answers are unreadable: %s", exc)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(HelperLost("the refresh helper stopped during a refresh"))

    async def close(self, *, wait: float) -> None:
        """Close our end (the helper then finishes and exits) and wait up to `wait` for it."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        try:
            await asyncio.to_thread(self.process.wait, wait)
        except subprocess.TimeoutExpired:
            log.warning("the refresh helper (pid %d) is still finishing", self.process.pid)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)


class Exchanger:
    """The one refresh helper of this process: started once, again if it died."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """`environ`: where the helper's few variables and the key source come from (this
        process's environment by default); `command`: the helper's command line before its
        descriptor number (`python -m proxy.lifecycle.exchanger` by default)."""
        self._config = config
        self._environ = os.environ if environ is None else environ
        self._command = (
            list(command) if command is not None else [sys.executable, "-m", HELPER_MODULE]
        )
        self._link: _Link | None = None
        self._starting: asyncio.Future[_Link] | None = None
        self._retry_at = float("-inf")
        self._ended: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The running helper's process id (None while there is none)."""
        link = self._link
        return link.process.pid if link is not None and link.alive else None

    def start_soon(self) -> None:
        """Start the helper in the background (the first refresh waits for it)."""
        self._starting = asyncio.ensure_future(self._spawn())
        self._starting.add_done_callback(_retrieved)

    async def ready(self) -> bool:
        """Wait until the helper runs; False when it cannot start (refreshes then run here)."""
        try:
            await self._running()
        except HelperUnavailable:
            return False
        return True

    def discard(self, name: str) -> None:
        """Tell the helper to drop what it keeps for `name` (a logout); none running: none."""
        if self._link is not None and self._link.alive:
            self._link.post(wire.discard_doc(name))

    async def refresh(
        self, name: str, wanted: Wanted, *, token_request: float, priority: Priority
    ) -> wire.Answer:
        """The helper's answer to one refresh; HelperUnavailable or HelperLost otherwise.
        If `priority` is promoted meanwhile, the helper's limiter ranks the call as urgent."""
        link = await self._running()
        wanted = dataclasses.replace(wanted, urgent=priority.urgent)  # as it is now
        request = wire.Request(link.next_id(), name, wanted, token_request)
        timeout = 2 * token_request + 10 + ANSWER_MARGIN  # lock wait + token request + writes
        # Posted after the request (one stream, in order), so the helper knows its id.
        with priority.watch(lambda: link.post(wire.promote_doc(request.id))):
            return await link.ask(request, timeout=timeout)

    async def close(self) -> None:
        """Close our end; the helper finishes what holds a lock, and exits."""
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()  # its clean-up closes the socket and reaps the helper
            await asyncio.gather(starting, return_exceptions=True)
        wait = self._config.timeouts.token_request + 10
        # A helper started early (start_soon) that no refresh ever asked for was never
        # taken up as the link: it is closed and reaped all the same.
        if starting is not None and _succeeded(starting) and starting.result() is not self._link:
            await starting.result().close(wait=wait)
        if self._link is not None:
            await self._link.close(wait=wait)
            self._link = None
        await asyncio.gather(*self._ended, return_exceptions=True)

    async def _running(self) -> _Link:
        if self._closed:
            raise HelperUnavailable("the proxy is shutting down")
        if self._link is not None:
            if self._link.alive:
                return self._link
            self._bury(self._link)
            self._link, self._starting = None, None
        if self._starting is None:
            if time.monotonic() < self._retry_at:
                raise HelperUnavailable("the refresh helper could not start a moment ago")
            self._starting = asyncio.ensure_future(self._spawn())
            self._starting.add_done_callback(_retrieved)
        starting = self._starting
        try:
            link = await asyncio.shield(starting)
        except Exception as exc:
            if self._starting is starting:  # the first to see it: report once, pause
                self._starting = None
                self._retry_at = time.monotonic() + RESTART_PAUSE
                log.error("the refresh helper could not start (%s); refreshing here", exc)
            raise HelperUnavailable(str(exc)) from None
        self._link = link
        return link

    def _bury(self, link: _Link) -> None:
        """Reap a helper that stopped (in the background)."""
        task = asyncio.create_task(link.close(wait=self._config.timeouts.token_request + 10))
        self._ended.add(task)
        task.add_done_callback(self._ended.discard)

    async def _spawn(self) -> _Link:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                # subprocess, not the event loop's own: uvloop's spawn leaves descriptors
                # of its own (dups of /dev/null and stdio, a pipe) open in the child. A
                # fork and exec takes milliseconds, once per helper.
                process = self._popen(theirs.fileno())
            finally:
                theirs.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        link = _Link(process, reader, writer)
        try:
            await wire.send(writer, wire.settings_doc(self._settings()))
            hello = await link.hello(START_TIMEOUT)
        except BaseException:
            await link.close(wait=5.0)
            raise
        if hello.get("ready") is not True:
            await link.close(wait=5.0)
            raise HelperLost(f"the refresh helper did not start: {hello.get('error')}")
        return link

    def _popen(self, fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*self._command, str(fd)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=helper_environment(self._environ),
            # Only its end of the socket (and stderr, for its log lines).
            close_fds=True,
            pass_fds=(fd,),
            # Its own session: signals for the proxy's process group or terminal (a SIGKILL
            # of the group, Ctrl-C) do not end an exchange in flight.
            start_new_session=True,
        )

    def _settings(self) -> wire.Settings:
        key_environ = {
            name: self._environ[name] for name in KEY_VARIABLES if self._environ.get(name)
        }
        proxy, auth = _environment_proxy(self._config.pleo.token_url)
        level, fmt = log_settings()
        return wire.Settings(
            self._config,
            key_environ,
            proxy_url=str(proxy) if proxy is not None else None,
            proxy_login=auth.login if auth is not None else None,
            proxy_password=auth.password if auth is not None else None,
            log_level=level,
            log_format=fmt,
        )


def _environment_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """HTTPS_PROXY/HTTP_PROXY for `url` unless NO_PROXY excludes it (as the proxy's session)."""
    try:
        return aiohttp.helpers.get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def _succeeded(future: asyncio.Future[_Link]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _retrieved(future: asyncio.Future[_Link]) -> None:
    if not future.cancelled():
        future.exception()  # a failed background start is reported when it is awaited
