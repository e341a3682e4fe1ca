"""Which connections exist, in memory or not, and what is known of the others: their last
state and Pleo subject, and the names lately looked up in the store in vain. No I/O: the
registry tells it what the store and the managers say. Must not read the store or load
a connection.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from proxy.lifecycle.rules import state_of
from proxy.names import DEFAULT_CONNECTION
from proxy.tokenset import StoredState

MISS_INTERVAL = 1.0  # an unknown name is looked up in the store at most this often
MAX_MISSES = 10_000  # remembered unknown names; bounded so random names cannot grow memory


class KnownConnections:
    """Names that exist (configured, or with an entry in the store); O(1) membership."""

    def __init__(self, configured: Iterable[str]) -> None:
        self._names: set[str] = set(configured)
        self._states: dict[str, str] = {}  # last known state of every known connection
        self._subjects: dict[str, str] = {}  # and its Pleo subject, when it has one
        self._misses: dict[str, float] = {}  # name → when last missed, on the steady clock

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        """Sorted (O(n log n): not per request)."""
        return sorted(self._names)

    def implied(self) -> str | None:
        """The connection a request that names none means, in O(1): `default`, else the
        only one; None when there are several (or none)."""
        if DEFAULT_CONNECTION in self._names:
            return DEFAULT_CONNECTION
        return next(iter(self._names)) if len(self._names) == 1 else None

    def add(self, names: Iterable[str]) -> None:
        self._names.update(names)

    def missing_from(self, present: set[str]) -> list[str]:
        """Known names without an entry in `present` (the store's names), sorted."""
        return sorted(self._names - present)

    def forget(self, name: str) -> None:
        self._names.discard(name)
        self._states.pop(name, None)
        self._subjects.pop(name, None)

    def note_state(self, name: str, state: str) -> None:
        """The state of a connection, kept for when it is no longer in memory."""
        self._states[name] = state

    def note_entry(self, name: str, stored: StoredState | None) -> None:
        """What an entry read for a connection not in memory says of it."""
        self._states[name] = state_of(stored).value
        if stored is not None and stored.subject:
            self._subjects[name] = stored.subject

    def state_counts(self, in_memory: Mapping[str, str]) -> collections.Counter[str]:
        """Connections by state; `in_memory`: the current states of those in memory."""
        states = self._states | dict(in_memory)
        return collections.Counter(states[name] for name in self._names if name in states)

    def same_subject(self, name: str, subject: str, in_memory: Mapping[str, str]) -> list[str]:
        """The other connections authorised for `subject`; `in_memory`: subjects of those
        in memory (kept, for when they are not)."""
        self._subjects.update(in_memory)
        return sorted(n for n, s in self._subjects.items() if s == subject and n != name)

    def missed_lately(self, name: str, now: float) -> bool:
        """Looked up in vain less than MISS_INTERVAL ago (`now`: the steady clock)."""
        return now - self._misses.get(name, float("-inf")) < MISS_INTERVAL

    def remember_miss(self, name: str, now: float) -> None:
        if len(self._misses) >= MAX_MISSES:
            self._misses.clear()
        self._misses[name] = now

    def found(self, name: str) -> None:
        """`name` exists after all (loaded, or created here)."""
        self._names.add(name)
        self._misses.pop(name, None)
