"""The refresh helper: a process whose token exchanges outlive the proxy process that asked.

`python -m proxy.lifecycle.exchanger FD`, started by `proxy.lifecycle.exchange`: FD is its
end of a socketpair, and the first frame on it holds the settings (the only way a secret
reaches it: never argv, never the environment). Each request runs one `RefreshSequence`
(store lock, re-read, mark, Pleo, persist, release) and answers. SIGTERM, SIGINT and SIGHUP
are ignored: it ends when its proxy's end closes, once the runs that hold a store lock have
finished (within the token-request timeout), dropping the runs still waiting for one.
Must not listen, serve HTTP, start processes, or log anything the proxy would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import aiohttp

from proxy.lifecycle import wire
from proxy.lifecycle.limiter import Priority, TokenLimiter
from proxy.lifecycle.refresh import Pending, Refreshed, RefreshSequence
from proxy.ops.logs import redact, setup_logging
from proxy.store import ConnectionStores, open_stores

log = logging.getLogger("proxy.tokens")

SETTINGS_TIMEOUT = 10.0  # the proxy sends the settings right after the start
# After the proxy's end closed: what the runs holding a lock may take beyond the token
# request itself (the mark and the final write, each one atomic file write or Redis SET).
WRITE_GRACE = 5.0
IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The shared upstream session adds none of its own; the token request sets its own.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")


class Helper:
    """Answers one proxy's refresh requests, every connection of it, until its end closes."""

    def __init__(
        self, settings: wire.Settings, stores: ConnectionStores, session: aiohttp.ClientSession
    ) -> None:
        self._config = settings.config
        self._stores = stores
        self._session = session
        refresh = self._config.refresh
        # Process-wide, as in the proxy: this helper makes all of its proxy's token calls.
        self._limiter = TokenLimiter(refresh.max_concurrent, max_per_second=refresh.max_per_second)
        # What a run could not write after Pleo answered, per connection (written first
        # by the next run, or at exit); and how often a connection's was discarded.
        self._pending: dict[str, Pending] = {}
        self._discards: Counter[str] = Counter()
        self._turns: dict[str, asyncio.Lock] = {}
        self._waiting: Counter[str] = Counter()
        self._runs: dict[asyncio.Task[None], wire.RecordedEvents] = {}
        self._priorities: dict[int, Priority] = {}  # of the requests not answered yet
        self._token_request = self._config.timeouts.token_request

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (frame := await wire.receive(reader)) is not None:
                if frame.get("op") == "discard":
                    self._discard(str(frame.get("name")))
                elif frame.get("op") == "promote":
                    self._promote(wire.parse_promote(frame))
                else:
                    self._start(wire.parse_request(frame), writer)
        except (wire.WireError, ConnectionError) as exc:
            log.error("the refresh helper stops: %s", exc)
        await self._finish()

    def _discard(self, name: str) -> None:
        """A logout or deletion: what was kept for `name` must never be written."""
        self._pending.pop(name, None)
        self._discards[name] += 1  # and a run in flight keeps nothing either

    def _promote(self, request_id: int) -> None:
        """A request now waits for this one: it goes before background refreshes."""
        priority = self._priorities.get(request_id)
        if priority is not None:  # None: answered already
            priority.promote()

    def _start(self, request: wire.Request, writer: asyncio.StreamWriter) -> None:
        self._token_request = request.token_request
        events = wire.RecordedEvents()
        priority = self._priorities[request.id] = Priority(urgent=request.wanted.urgent)
        task = asyncio.create_task(self._answer(request, events, writer, priority))
        self._runs[task] = events
        task.add_done_callback(self._runs.pop)
        task.add_done_callback(lambda _: self._priorities.pop(request.id, None))

    async def _answer(
        self,
        request: wire.Request,
        events: wire.RecordedEvents,
        writer: asyncio.StreamWriter,
        priority: Priority,
    ) -> None:
        discards = self._discards[request.name]
        async with self._turn(request.name):
            sequence: RefreshSequence | None = None
            result: Refreshed | BaseException
            try:
                sequence = self._sequence(request, events)
                result = await sequence.run_wanted(request.wanted, priority=priority)
            except Exception as exc:  # every failure is an answer
                result = exc
            finally:
                kept = sequence.pending if sequence is not None else None
                if kept is not None and self._discards[request.name] == discards:
                    self._pending[request.name] = kept
            answer = wire.answer_doc(
                request.id,
                result,
                events=events,
                recorded=sequence.recorded if sequence is not None else None,
                pending=self._pending.get(request.name),
            )
        with contextlib.suppress(ConnectionError):
            await wire.send(writer, answer)  # the proxy may have gone: the store has it all

    def _sequence(self, request: wire.Request, events: wire.RecordedEvents) -> RefreshSequence:
        timeouts = dataclasses.replace(self._config.timeouts, token_request=request.token_request)
        sequence = RefreshSequence(
            dataclasses.replace(self._config, timeouts=timeouts),
            self._stores.store(request.name),
            self._session,
            clock=time.time,
            events=events,
            limiter=self._limiter,
        )
        sequence.pending = self._pending.pop(request.name, None)
        return sequence

    @contextlib.asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """One run per connection at a time (the proxy asks once; a retry may overlap)."""
        lock = self._turns.setdefault(name, asyncio.Lock())
        self._waiting[name] += 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[name] -= 1
            if self._waiting[name] == 0:
                del self._waiting[name], self._turns[name]

    async def _finish(self) -> None:
        """The proxy's end closed: finish what reached the store lock, drop the rest; all
        within the token-request timeout and WRITE_GRACE, whatever the store does."""
        for task, events in list(self._runs.items()):
            if not events.holding_lock:
                task.cancel()  # nothing was marked or sent to Pleo for it yet
        runs = list(self._runs)
        try:
            async with asyncio.timeout(self._token_request + WRITE_GRACE):
                if runs:
                    await asyncio.wait(runs)
                await self._write_pending()
        except TimeoutError:
            log.error("the refresh helper gave up on what it still had to do, and exits")
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def _write_pending(self) -> None:
        """Last chance for what runs could not write (new tokens above all): nobody asks
        for it after this. Written under the lock, and only where the store still holds
        the mark it replaces (`RefreshSequence.flush_pending`)."""
        for name, pending in list(self._pending.items()):
            store = self._stores.store(name)
            sequence = RefreshSequence(
                self._config, store, self._session, clock=time.time, events=wire.RecordedEvents()
            )
            sequence.pending = pending
            try:
                async with store.lock(WRITE_GRACE):
                    await sequence.flush_pending(await store.load())
            except Exception as exc:  # logged: nothing else is left to do
                log.error("a refresh result could not be written before exit: %s", exc)


def ssl_context(settings: wire.Settings) -> ssl.SSLContext:
    """The system trust store, plus `pleo.ca_file` if set: as the proxy's own session."""
    context = ssl.create_default_context()
    ca_file = settings.config.pleo.ca_file
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def token_session(settings: wire.Settings) -> aiohttp.ClientSession:
    """A session like the proxy's upstream one, for token requests only."""
    timeouts = settings.config.timeouts
    auth = None
    if settings.proxy_login is not None:
        auth = aiohttp.BasicAuth(settings.proxy_login, settings.proxy_password or "")
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context(settings)),
        trust_env=False,
        proxy=settings.proxy_url,
        proxy_auth=auth,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        ),
    )


async def run(fd: int) -> int:
    """Serve the proxy on the socket `fd` until its end closes; the exit code."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        try:
            first = await asyncio.wait_for(wire.receive(reader), SETTINGS_TIMEOUT)
            settings = wire.parse_settings(first) if first is not None else None
        except (TimeoutError, wire.WireError) as exc:
            await wire.send(writer, {"ready": False, "error": str(exc) or "no settings"})
            return 2
        if settings is None:
            return 0  # the proxy went away before it said anything
        setup_logging(settings.log_level, fmt=settings.log_format)
        return await _serve(settings, reader, writer)
    finally:
        writer.close()


async def _serve(
    settings: wire.Settings, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int:
    stores = open_stores(settings.config, environ=settings.key_environ)
    try:
        async with token_session(settings) as session:
            await wire.send(writer, {"ready": True, "pid": os.getpid()})
            await Helper(settings, stores, session).serve(reader, writer)
    finally:
        await stores.close()
    return 0


def main(argv: Sequence[str]) -> int:
    # The service manager's stop signal reaches every process of the unit at once; the
    # proxy shuts down on it, and this process ends when the proxy's end closes.
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if len(argv) != 1 or not argv[0].isdigit():
        print(
            "usage: python -m proxy.lifecycle.exchanger FD (started by pleo-proxy)", file=sys.stderr
        )
        return 2
    try:
        return asyncio.run(run(int(argv[0])))
    except (ConnectionError, wire.WireError):
        return 0  # the proxy went away while we started: nothing was asked
    except Exception as exc:  # never a traceback: one line, redacted like the logs
        print(f"error: refresh helper: {redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
