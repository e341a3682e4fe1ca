"""The connections of one process: which exist, their token managers, and finding new ones.

Configured connections always exist; any other exists while the store holds an entry
for it (made by `pleo-proxy connect`, the admin API, an import, or another instance).
Lookups by name are O(1) in memory (`cache`); a name not known (`known`) is looked up
in the store at most once a second. Changes made elsewhere come in within a second, by
the store's change marker (`watch`); the due times of connections not in memory come
from a survey of their entries (`survey`). Must not speak HTTP or render pages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.config import Config
from proxy.errors import UnknownConnection
from proxy.lifecycle import survey
from proxy.lifecycle.cache import ManagerCache
from proxy.lifecycle.clocks import Clock, steady_clock
from proxy.lifecycle.exchange import Exchanger
from proxy.lifecycle.known import KnownConnections
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.rules import TokenEvents, TokenState
from proxy.lifecycle.scheduler import RefreshScheduler
from proxy.lifecycle.watch import ChangeMarker, every_interval
from proxy.names import DEFAULT_CONNECTION, is_valid_name
from proxy.store import ConnectionStores
from proxy.tokenset import Link, TokenSet

log = logging.getLogger("proxy.connections")

LINK_CODE_BYTES = 32

StateHook = Callable[[str, TokenState, TokenState, str | None], None]
AddedHook = Callable[[TokenManager, bool], None]


class ConnectionEvents(TokenEvents):
    """One connection's events: counted process-wide, state changes named for the sink."""

    def __init__(self, name: str, counters: TokenEvents, on_state: StateHook | None) -> None:
        self._name = name
        self._counters = counters
        self._on_state = on_state

    def refreshed(self, outcome: str) -> None:
        self._counters.refreshed(outcome)

    def lock_waited(self, seconds: float) -> None:
        self._counters.lock_waited(seconds)

    def state_changed(self, previous: TokenState, state: TokenState, reason: str | None) -> None:
        if self._on_state is not None:
            self._on_state(self._name, previous, state, reason)


@dataclass(frozen=True)
class IssuedLink:
    """A new connect link: the code is shown once, to whoever asked for it."""

    connection: str
    code: str
    expires_at: float
    created: bool  # the connection did not exist before


def code_hash(code: str) -> str:
    """What the store keeps of a link code (the code itself is never stored)."""
    return hashlib.sha256(code.encode()).hexdigest()


class Registry:
    """Every connection this process serves, by name."""

    def __init__(
        self,
        config: Config,
        stores: ConnectionStores,
        session: aiohttp.ClientSession,
        *,
        clock: Clock = time.time,
        steady: Clock = steady_clock,
        counters: TokenEvents | None = None,
        on_state: StateHook | None = None,
        exchanger: Exchanger | None = None,
    ) -> None:
        """`clock` and `steady`: the wall and steady clocks (see `clocks`); `exchanger`:
        the refresh helper every connection's refreshes go through."""
        self._config = config
        self._exchanger = exchanger
        self._stores = stores
        self._session = session
        self._clock = clock
        self._steady = steady
        self._counters = counters if counters is not None else TokenEvents()
        self._on_state = on_state
        self.limiter = TokenLimiter(
            config.refresh.max_concurrent, max_per_second=config.refresh.max_per_second
        )
        self.configured = frozenset(config.connections.names)
        # Every connection that exists (configured, or with an entry in the store); only
        # some are in memory, least recently used first.
        self._known = KnownConnections(self.configured)
        self._memory = ManagerCache(
            self._start_manager, bound=config.connections.cache, pinned=self.configured
        )
        self.scheduler = RefreshScheduler(
            self.find, clock=clock, steady=steady, workers=config.refresh.max_concurrent
        )
        self._survey: asyncio.Task[None] | None = None
        self._added: list[AddedHook] = []
        self._marker = ChangeMarker(stores)
        self._background = True
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Verify the store and load the configured connections; the others are only
        listed (loaded on first use). With `background`, schedule refreshes and watch."""
        self._background = background
        await self._stores.verify()
        await self._marker.start()
        # A configured connection that cannot load stops start-up.
        for name in sorted(self.configured):
            await self._memory.load(name)
        others = sorted(set(await self._stores.names()) - self.configured)
        self._known.add(others)
        if background:
            await self.scheduler.start()
            # Their keep-alive due times, read a few at a time: start-up stays fast and
            # calls Pleo never, yet no idle connection is forgotten.
            self._survey = asyncio.create_task(self._read_due_times(others), name="survey")
            self._watcher = asyncio.create_task(
                every_interval(self._watch_step), name="connections-watch"
            )

    async def close(self) -> None:
        for task in (self._watcher, self._survey):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._survey = None
        await self.scheduler.close()
        await self._memory.close()

    def on_added(self, hook: AddedHook) -> None:
        """Call `hook(manager, configured)` for every connection, now and when added."""
        self._added.append(hook)
        for manager in self._memory.values():
            hook(manager, manager.name in self.configured)

    def use_config(self, config: Config) -> None:
        """Timeouts of a reloaded configuration, for every manager."""
        self._config = config
        for manager in self._memory.values():
            manager.use_timeouts(config.timeouts)

    # -- lookups ---------------------------------------------------------------------

    def get(self, name: str) -> TokenManager | None:
        """The connection's manager if it is in memory (O(1), no I/O)."""
        return self._memory.get(name)

    def names(self) -> list[str]:
        """Every connection that exists, in memory or not (O(n log n): not per request)."""
        return self._known.names()

    def __len__(self) -> int:
        return len(self._known)

    def implied(self) -> str | None:
        """The connection a request that names none means (see `KnownConnections`)."""
        return self._known.implied()

    def managers(self) -> list[TokenManager]:
        """The connections in memory."""
        return sorted(self._memory.values(), key=lambda manager: manager.name)

    def state_counts(self) -> collections.Counter[str]:
        """Connections by their last known state, in memory or not."""
        in_memory = {m.name: m.state.value for m in self._memory.values()}
        return self._known.state_counts(in_memory)

    async def find(self, name: str) -> TokenManager | None:
        """The connection's manager, from memory or, for a name new to us, the store."""
        manager = self.get(name)
        if manager is not None:
            return manager
        if not is_valid_name(name):
            return None  # callers check first; a bad name must never reach a file path
        if name in self._known:
            return await self._memory.load(name)
        now = self._steady()
        if self._known.missed_lately(name, now):
            return None
        if not await self._stores.exists(name):
            self._known.remember_miss(name, now)
            return None
        return await self._memory.load(name)

    async def require(self, name: str) -> TokenManager:
        manager = await self.find(name)
        if manager is None:
            raise UnknownConnection(f"no connection named {name!r}")
        return manager

    async def _start_manager(self, name: str) -> TokenManager:
        configured = name in self.configured
        manager = TokenManager(
            self._config,
            self._stores.store(name),
            self._session,
            clock=self._clock,
            steady=self._steady,
            events=ConnectionEvents(name, self._counters, self._on_state),
            name=name,
            limiter=self.limiter,
            exchanger=self._exchanger,
        )
        # The scheduler refreshes in the background; the watch loop brings in changes.
        await manager.start(background=False, verify=False, poll_store=configured)
        if self._background:
            manager.on_due(self._schedule)
        self._memory.add(manager)
        self._known.found(name)
        for hook in list(self._added):
            hook(manager, configured)
        for evicted in self._memory.evict_over_bound():
            # The scheduler keeps its due time; it is loaded again when that comes.
            self._known.note_state(evicted.name, evicted.state.value)
        return manager

    def _schedule(self, manager: TokenManager) -> None:
        self._known.note_state(manager.name, manager.state.value)
        self.scheduler.schedule(manager.name, manager.next_refresh(self._clock(), jitter=True))

    async def _read_due_times(self, names: list[str]) -> None:
        """Schedule the connections not in memory by what their entries say."""
        entries = survey.read_entries(self._stores, names, skip=self._memory.__contains__)
        async with contextlib.aclosing(entries):
            async for name, stored in entries:
                self._known.note_entry(name, stored)
                due = survey.unused_due(stored, self._config.refresh, now=self._clock())
                self.scheduler.schedule(name, due)

    # -- changes ---------------------------------------------------------------------

    async def create(self, name: str) -> tuple[TokenManager, bool]:
        """The connection, made (an empty entry in the store) if it is new."""
        manager = await self.find(name)
        if manager is not None:
            return manager, False
        manager = await self._memory.load(name)
        await manager.logout(keep_entry=True)
        self._known.found(name)
        await self._stores.touch()
        log.info(
            "connection created",
            extra={"fields": {"event": "connection.created", "connection": name}},
        )
        return manager, True

    async def issue_link(self, name: str, *, return_to: str | None = None) -> IssuedLink:
        """A new one-time connect link for `name` (created if new); replaces older links."""
        manager, created = await self.create(name)
        code = secrets.token_urlsafe(LINK_CODE_BYTES)
        expires_at = self._clock() + self._config.connections.link_ttl
        await manager.save_link(Link(code_hash(code), expires_at, return_to))
        await self._stores.touch()
        return IssuedLink(name, code, expires_at, created)

    async def install(
        self,
        name: str,
        tokens: TokenSet,
        *,
        subject: str | None = None,
        company_name: str | None = None,
        notify: bool = True,
    ) -> TokenManager:
        """Persist a new grant for `name` (created if new) and tell other processes
        (`notify=False` for all but the last of a bulk import)."""
        manager = await self.find(name) or await self._memory.load(name)
        twins = self._same_subject(name, subject)
        if twins:
            log.warning(
                "connection %s authorised the same Pleo subject as %s",
                name,
                ", ".join(twins),
                extra={"fields": {"event": "connection.same_subject", "connection": name}},
            )
        extra = {"same_subject_as": twins} if twins else {}
        await manager.install(tokens, subject=subject, company_name=company_name, extra=extra)
        if notify:
            await self._stores.touch()
        return manager

    def _same_subject(self, name: str, subject: str | None) -> list[str]:
        if subject is None:
            return []
        in_memory = {
            m.name: m.stored.subject
            for m in self._memory.values()
            if m.stored is not None and m.stored.subject
        }
        return self._known.same_subject(name, subject, in_memory)

    async def logout(self, name: str) -> None:
        manager = await self.require(name)
        await manager.logout(keep_entry=name != DEFAULT_CONNECTION)
        await self._stores.touch()

    async def delete(self, name: str) -> bool:
        """Forget the connection's tokens here and, through the store, everywhere."""
        manager = await self.find(name)
        if manager is None:
            return False
        await manager.forget()
        await self._stores.touch()
        await self._drop(name)
        log.info(
            "connection deleted",
            extra={"fields": {"event": "connection.deleted", "connection": name}},
        )
        return True

    async def _drop(self, name: str) -> None:
        """Stop serving a connection whose entry is gone (configured ones stay, unauthorised)."""
        manager = self._memory.peek(name)
        if manager is None:
            if name not in self.configured:
                self._forget_name(name)
            return
        if name in self.configured:
            await manager.reload()
            return
        self._memory.pop(name)
        self._forget_name(name)
        await manager.close()

    def _forget_name(self, name: str) -> None:
        self._known.forget(name)
        self.scheduler.schedule(name, None)

    # -- watching the store ----------------------------------------------------------

    async def _watch_step(self) -> None:
        await self.sync()
        await self._poll_configured()

    async def _poll_configured(self) -> None:
        """Configured connections without tokens re-read their entry each second, as the
        single connection always did (tokens may be written without the change marker)."""
        for name in self.configured:
            manager = self._memory.peek(name)
            if manager is not None and manager.tokens is None:
                await manager.reread_if_due()

    async def sync(self) -> None:
        """If the store changed: add new connections, drop deleted ones, pick up tokens."""
        present = await self._marker.names_if_changed()
        if present is None:
            return
        new = sorted(name for name in present if name not in self._known)
        self._known.add(new)
        for name in self._known.missing_from(present):
            manager = self._memory.peek(name)
            # A configured connection stays; it only forgets tokens deleted elsewhere.
            if name not in self.configured or (manager is not None and manager.stored):
                await self._drop(name)
        if self._background and new:
            await self._read_due_times(new)
        for manager in self.managers():
            if manager.state in (TokenState.UNAUTHORISED, TokenState.REAUTHORIZATION_REQUIRED):
                await manager.reread()
