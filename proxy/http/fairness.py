"""Per-connection fairness: `limits.per_connection` as an in-flight count and a token bucket.

Owns the admission rule (a request over its connection's concurrency or rate is refused
with `RateLimited`, its Retry-After computed here), the slot held until the answer is
sent, and a bounded table of per-connection state: an entry that is idle (nothing in
flight, bucket full) says nothing a fresh one would not, so it is dropped. Must not read
bodies, forward, or name a connection in a metric.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NoReturn

from aiohttp import web

from proxy.config import PerConnection
from proxy.errors import RateLimited

# Entries kept before idle ones are dropped: far above the connections busy at once,
# small next to the thousands a partner's proxy serves.
MAX_ENTRIES = 4096
PRUNE_STEP = 4  # entries looked at per new one: keeps pruning O(1) per request
# A slot frees when some answer ends, which the proxy cannot foresee: the shortest hint.
CONCURRENCY_RETRY_AFTER = 1

RefusalHook = Callable[[str], None]


@dataclass
class _Entry:
    """One connection's state: requests in flight, and its bucket as of `updated`."""

    tokens: float
    updated: float
    in_flight: int = 0


class Fairness:
    """Admission for every connection of one process, e.g.

    `fairness = Fairness(PerConnection(concurrency=4, rate=10), clock=fake)`;
    `with fairness.slot("acme"): ...` raises RateLimited or holds a slot until the end.
    """

    def __init__(
        self,
        limits: PerConnection,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
        on_refusal: RefusalHook | None = None,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._max_entries = max(1, max_entries)
        self._on_refusal = on_refusal
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def slot(self, name: str) -> AbstractContextManager[None]:
        """Admit one request of connection `name` and hold its slot while the block runs."""
        if self.limits.unlimited:
            return _NO_SLOT
        return _Slot(self, name)

    def admit(self, name: str) -> None:
        """Take a slot and a token for `name`, or raise RateLimited and take nothing."""
        now = self._clock()
        entry = self._entry(name, now)
        limits = self.limits
        # Concurrency first: a request refused for it must not spend a rate token.
        if limits.concurrency is not None and entry.in_flight >= limits.concurrency:
            self._refuse(
                "concurrency",
                f"connection {name!r} already has {limits.concurrency} requests in flight",
                CONCURRENCY_RETRY_AFTER,
            )
        if limits.rate is not None:
            if entry.tokens < 1:
                wait = math.ceil((1 - entry.tokens) / limits.rate)
                self._refuse("rate", f"connection {name!r} is over {limits.rate:g} req/s", wait)
            entry.tokens -= 1
        entry.in_flight += 1

    def release(self, name: str) -> None:
        """The request admitted for `name` is done; an entry left idle is dropped now."""
        entry = self._entries.get(name)
        if entry is None:  # cannot happen: entries with requests in flight are kept
            return
        entry.in_flight = max(0, entry.in_flight - 1)
        if self._is_idle(entry, self._clock()):
            del self._entries[name]

    def _entry(self, name: str, now: float) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            self._prune(now)  # before adding: the new entry is never the one dropped
            entry = _Entry(tokens=float(self.limits.bucket_size), updated=now)
            self._entries[name] = entry
        else:
            self._entries.move_to_end(name)
            self._refill(entry, now)
        return entry

    def _refill(self, entry: _Entry, now: float) -> None:
        rate = self.limits.rate
        if rate is not None and now > entry.updated:
            entry.tokens = min(self.limits.bucket_size, entry.tokens + (now - entry.updated) * rate)
        entry.updated = max(entry.updated, now)

    def _is_idle(self, entry: _Entry, now: float) -> bool:
        self._refill(entry, now)
        return entry.in_flight == 0 and entry.tokens >= self.limits.bucket_size

    def _prune(self, now: float) -> None:
        # Least recently used first: every bucket refills at the same rate, so those are
        # the first to be idle again. A busy one is rotated to the back, never dropped
        # (that would forget requests in flight or hand out a fresh burst).
        for _ in range(PRUNE_STEP):
            if len(self._entries) < self._max_entries:
                return
            name, entry = next(iter(self._entries.items()))
            if self._is_idle(entry, now):
                del self._entries[name]
            else:
                self._entries.move_to_end(name)

    def _refuse(self, reason: str, detail: str, retry_after: int) -> NoReturn:
        if self._on_refusal is not None:
            self._on_refusal(reason)
        raise RateLimited(
            f"{detail}; retry after {max(1, retry_after)} s", reason=reason, retry_after=retry_after
        )


FAIRNESS_KEY = web.AppKey("fairness", Fairness)


class _Slot:
    """One admitted request's slot, given back when its block ends, however it ends.

    A plain object rather than a @contextmanager generator: every request waiting on
    Pleo holds one, and a generator with its frame costs several times the memory.
    """

    __slots__ = ("_fairness", "_name")

    def __init__(self, fairness: Fairness, name: str) -> None:
        self._fairness = fairness
        self._name = name

    def __enter__(self) -> None:
        self._fairness.admit(self._name)

    def __exit__(self, *exc_info: object) -> None:
        self._fairness.release(self._name)


# Without limits (the default) a request holds nothing: one shared, reusable no-op.
_NO_SLOT: AbstractContextManager[None] = nullcontext()
