"""The connections of one process: which exist, their token managers, and finding new ones.

Configured connections always exist; any other exists while the store holds an entry
for it (made by `pleo-proxy connect`, the admin API, an import, or another instance).
Lookups by name are O(1) in memory. A name not in memory is looked up in the store at
most once a second, and a poll of the store's change marker (one stat or GET a second)
brings in connections created, authorised or deleted elsewhere within a second.
Must not speak HTTP or render pages.
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
from proxy.errors import StoreError, UnknownConnection
from proxy.lifecycle.clocks import Clock, steady_clock
from proxy.lifecycle.exchange import Exchanger
from proxy.lifecycle.limiter import TokenLimiter
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.rules import TokenEvents, TokenState, refresh_due, state_of
from proxy.lifecycle.scheduler import RefreshScheduler
from proxy.names import DEFAULT_CONNECTION, is_valid_name
from proxy.store import ConnectionStores
from proxy.tokenset import Link, TokenSet

log = logging.getLogger("proxy.connections")

WATCH_INTERVAL = 1.0  # how often the store's change marker is read
SURVEY_BATCH = 200  # entries read at start-up between pauses...
SURVEY_PAUSE = 0.05  # ...so that reading 10,000 of them never holds up requests
MISS_INTERVAL = 1.0  # an unknown name is looked up in the store at most this often
MAX_MISSES = 10_000  # remembered unknown names; bounded so random names cannot grow memory
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


def _log_event(message: str, event: str, name: str) -> None:
    log.info(message, extra={"fields": {"event": event, "connection": name}})


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


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
        self._known: set[str] = set(self.configured)
        self._managers: collections.OrderedDict[str, TokenManager] = collections.OrderedDict()
        self._states: dict[str, str] = {}  # last known state of every known connection
        self._subjects: dict[str, str] = {}  # and its Pleo subject, when it has one
        self._loading: dict[str, asyncio.Future[TokenManager]] = {}
        self._cache = config.connections.cache
        self.scheduler = RefreshScheduler(
            self.find, clock=clock, steady=steady, workers=config.refresh.max_concurrent
        )
        self._survey: asyncio.Task[None] | None = None
        self._misses: dict[str, float] = {}  # name → when last missed, on the steady clock
        self._added: list[AddedHook] = []
        self._marker = ""
        self._background = True
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Verify the store and load the configured connections; the others are only
        listed (loaded on first use). With `background`, schedule refreshes and watch."""
        self._background = background
        await self._stores.verify()
        self._marker = await self._stores.changed()
        for name in sorted(self.configured):
            await self._load(name)  # a configured connection that cannot load stops start-up
        others = sorted(set(await self._stores.names()) - self.configured)
        self._known.update(others)
        if background:
            await self.scheduler.start()
            # Their keep-alive due times, read a few at a time: start-up stays fast and
            # calls Pleo never, yet no idle connection is forgotten.
            self._survey = asyncio.create_task(self._read_due_times(others), name="survey")
            self._watcher = asyncio.create_task(self._watch(), name="connections-watch")

    async def close(self) -> None:
        for task in (self._watcher, self._survey):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._survey = None
        await self.scheduler.close()
        managers, self._managers = list(self._managers.values()), collections.OrderedDict()
        for manager in managers:
            await manager.close()

    def on_added(self, hook: AddedHook) -> None:
        """Call `hook(manager, configured)` for every connection, now and when added."""
        self._added.append(hook)
        for name, manager in self._managers.items():
            hook(manager, name in self.configured)

    def use_config(self, config: Config) -> None:
        """Timeouts of a reloaded configuration, for every manager."""
        self._config = config
        for manager in self._managers.values():
            manager.use_timeouts(config.timeouts)

    # -- lookups ---------------------------------------------------------------------

    def get(self, name: str) -> TokenManager | None:
        """The connection's manager if it is in memory (O(1), no I/O)."""
        manager = self._managers.get(name)
        if manager is not None:
            self._managers.move_to_end(name)
        return manager

    def names(self) -> list[str]:
        """Every connection that exists, in memory or not (O(n log n): not per request)."""
        return sorted(self._known)

    def __len__(self) -> int:
        return len(self._known)

    def implied(self) -> str | None:
        """The connection a request that names none means, in O(1): `default`, else the
        only one; None when there are several (or none)."""
        if DEFAULT_CONNECTION in self._known:
            return DEFAULT_CONNECTION
        return next(iter(self._known)) if len(self._known) == 1 else None

    def managers(self) -> list[TokenManager]:
        """The connections in memory."""
        return [self._managers[name] for name in sorted(self._managers)]

    def state_counts(self) -> collections.Counter[str]:
        """Connections by their last known state, in memory or not."""
        states = dict(self._states) | {m.name: m.state.value for m in self._managers.values()}
        return collections.Counter(states[name] for name in self._known if name in states)

    async def find(self, name: str) -> TokenManager | None:
        """The connection's manager, from memory or, for a name new to us, the store."""
        manager = self.get(name)
        if manager is not None:
            return manager
        if not is_valid_name(name):
            return None  # callers check first; a bad name must never reach a file path
        if name in self._known:
            return await self._load(name)
        now = self._steady()
        if now - self._misses.get(name, float("-inf")) < MISS_INTERVAL:
            return None
        if not await self._stores.exists(name):
            self._remember_miss(name, now)
            return None
        return await self._load(name)

    async def require(self, name: str) -> TokenManager:
        manager = await self.find(name)
        if manager is None:
            raise UnknownConnection(f"no connection named {name!r}")
        return manager

    def _remember_miss(self, name: str, now: float) -> None:
        if len(self._misses) >= MAX_MISSES:
            self._misses.clear()
        self._misses[name] = now

    async def _load_quietly(self, name: str) -> None:
        """Load a connection made at run time; one that cannot be read harms no other."""
        try:
            await self._load(name)
        except StoreError as exc:
            log.error(
                "connection %s cannot be loaded: %s",
                name,
                exc.detail,
                extra={"fields": {"event": "connection.unreadable", "connection": name}},
            )

    async def _load(self, name: str) -> TokenManager:
        """Single-flight: concurrent first uses of one name share one manager."""
        if name in self._managers:
            return self._managers[name]
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._start_manager(name))
            self._loading[name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(pending)

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
        self._managers[name] = manager
        self._known.add(name)
        self._misses.pop(name, None)
        for hook in list(self._added):
            hook(manager, configured)
        self._evict_over_bound()
        return manager

    def _schedule(self, manager: TokenManager) -> None:
        self._states[manager.name] = manager.state.value
        self.scheduler.schedule(manager.name, manager.next_refresh(self._clock(), jitter=True))

    def _evict_over_bound(self) -> None:
        """Drop the least recently used idle connections beyond `connections.cache`."""
        if not self._cache or len(self._managers) <= self._cache:
            return
        for name in list(self._managers):
            if len(self._managers) <= self._cache:
                return
            manager = self._managers[name]
            if name in self.configured or manager.busy:
                continue
            del self._managers[name]
            self._states[name] = manager.state.value
            # The scheduler keeps its due time; it is loaded again when that comes.
            task = asyncio.ensure_future(manager.close())
            task.add_done_callback(_retrieved)

    async def _read_due_times(self, names: list[str]) -> None:
        """Schedule the connections not in memory by what their entries say."""
        for index, name in enumerate(names):
            if name in self._managers:
                continue
            try:
                stored = await self._stores.store(name).load()
            except StoreError as exc:
                log.error("connection %s cannot be read: %s", name, exc.detail)
                continue
            if name in self._managers:
                continue  # loaded meanwhile: its manager schedules itself
            self._states[name] = state_of(stored).value
            if stored is not None and stored.subject:
                self._subjects[name] = stored.subject
            due = refresh_due(
                stored, self._config.refresh, now=self._clock(), last_used=-1e18, jitter=True
            )
            self.scheduler.schedule(name, due)
            if index % SURVEY_BATCH == SURVEY_BATCH - 1:
                await asyncio.sleep(SURVEY_PAUSE)

    # -- changes ---------------------------------------------------------------------

    async def create(self, name: str) -> tuple[TokenManager, bool]:
        """The connection, made (an empty entry in the store) if it is new."""
        manager = await self.find(name)
        if manager is not None:
            return manager, False
        manager = await self._load(name)
        await manager.logout(keep_entry=True)
        self._known.add(name)
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
        manager = await self.find(name) or await self._load(name)
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
        for manager in self._managers.values():
            if manager.stored is not None and manager.stored.subject:
                self._subjects[manager.name] = manager.stored.subject
        return sorted(n for n, s in self._subjects.items() if s == subject and n != name)

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
        manager = self._managers.get(name)
        if manager is None:
            if name not in self.configured:
                self._forget_name(name)
            return
        if name in self.configured:
            await manager.reload()
            return
        del self._managers[name]
        self._forget_name(name)
        await manager.close()

    def _forget_name(self, name: str) -> None:
        self._known.discard(name)
        self._states.pop(name, None)
        self._subjects.pop(name, None)
        self.scheduler.schedule(name, None)

    # -- watching the store ----------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.sync()
                await self._poll_configured()
            except StoreError as exc:
                log.warning("could not check the store for changed connections: %s", exc.detail)

    async def _poll_configured(self) -> None:
        """Configured connections without tokens re-read their entry each second, as the
        single connection always did (tokens may be written without the change marker)."""
        for name in self.configured:
            manager = self._managers.get(name)
            if manager is not None and manager.tokens is None:
                await manager.reread_if_due()

    async def sync(self) -> None:
        """If the store changed: add new connections, drop deleted ones, pick up tokens."""
        marker = await self._stores.changed()
        if marker == self._marker:
            return
        self._marker = marker
        present = set(await self._stores.names())
        new = sorted(present - self._known)
        self._known.update(new)
        for name in sorted(self._known - present):
            manager = self._managers.get(name)
            # A configured connection stays; it only forgets tokens deleted elsewhere.
            if name not in self.configured or (manager is not None and manager.stored):
                await self._drop(name)
        if self._background and new:
            await self._read_due_times(new)
        for manager in self.managers():
            if manager.state in (TokenState.UNAUTHORISED, TokenState.REAUTHORIZATION_REQUIRED):
                await manager.reread()
