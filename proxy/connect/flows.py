"""Started sign-ins, kept server-side by `state`: single use, expiring, bounded.

The `state` of a connection other than `default` starts with its name and `~` (a
character names cannot hold), so the one callback knows whose sign-in it finishes.
No I/O; must not hold codes or tokens beyond the PKCE verifier of a pending flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.connect import pkce
from proxy.names import DEFAULT_CONNECTION, is_valid_name
from proxy.secret import Secret

FLOW_LIFETIME = 600.0  # seconds a started sign-in may take at Pleo
MAX_PENDING_FLOWS = 16  # per connection: a few double clicks; bounded so a loop cannot grow
STATE_SEPARATOR = "~"


@dataclass(frozen=True)
class Flow:
    """One started sign-in."""

    connection: str
    verifier: Secret
    binding: Secret  # the value of the browser's cookie for this flow
    expires_at: float
    return_to: str | None = None  # where the browser goes afterwards (a connect link's)


def new_state(connection: str) -> str:
    """A fresh `state` naming `connection` (the default's carries no name, as always)."""
    state = pkce.new_state()
    return state if connection == DEFAULT_CONNECTION else f"{connection}{STATE_SEPARATOR}{state}"


def connection_of(state: str) -> str | None:
    """The connection a `state` names; None when it cannot be one of ours."""
    if STATE_SEPARATOR not in state:
        return DEFAULT_CONNECTION
    name = state.split(STATE_SEPARATOR, 1)[0]
    return name if is_valid_name(name) else None


class PendingFlows:
    """One connection's started sign-ins by state."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._flows: dict[str, Flow] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def add(self, state: str, flow: Flow) -> None:
        self._prune()
        while len(self._flows) >= MAX_PENDING_FLOWS:
            # dicts keep insertion order: the oldest flow makes room.
            del self._flows[next(iter(self._flows))]
        self._flows[state] = flow

    def peek(self, state: str) -> Flow | None:
        """The live flow for `state` (without using it up)."""
        self._prune()
        return self._flows.get(state)

    def discard(self, state: str) -> None:
        self._flows.pop(state, None)

    def clear(self) -> None:
        self._flows.clear()

    def _prune(self) -> None:
        now = self._clock()
        for state in [s for s, f in self._flows.items() if f.expires_at <= now]:
            del self._flows[state]
