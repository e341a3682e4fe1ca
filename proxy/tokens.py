"""The token manager: the one owner of the token state machine, refresh and retries.

States: unauthorised → authorised ⇄ refreshing → reauthorization_required.
Refresh sequence: single-flight in the process → store lock (bounded) → re-read the
store → refresh at Pleo → persist (fsync) → release → hand out.
Must not know file formats, Redis commands or aiohttp server objects.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import Config
from proxy.secret import Secret
from proxy.store import TokenStore
from proxy.tokenset import TokenSet


class TokenState(enum.Enum):
    UNAUTHORISED = "unauthorised"
    AUTHORISED = "authorised"
    REFRESHING = "refreshing"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"


StateListener = Callable[["TokenState"], None]


class TokenManager:
    """Hands out the current access token; refreshes it; implements CredentialSource."""

    def __init__(
        self,
        config: Config,
        store: TokenStore,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._session = session
        self._clock = clock
        self._listeners: list[StateListener] = []
        self._state = TokenState.UNAUTHORISED

    @property
    def state(self) -> TokenState:
        return self._state

    def subscribe(self, listener: StateListener) -> None:
        """Call `listener(state)` on every state change (and once now, with the current state)."""
        self._listeners.append(listener)
        listener(self._state)

    async def start(self) -> None:
        """Load the store and start the background refresh task."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def authorization(self, *, replayable: bool = True) -> Secret:
        raise NotImplementedError

    async def on_rejected(self, sent: Secret) -> Secret | None:
        raise NotImplementedError

    async def install(
        self, tokens: TokenSet, *, subject: str | None = None, company_name: str | None = None
    ) -> None:
        """Persist freshly granted tokens (after the authorise callback) and become authorised."""
        raise NotImplementedError

    async def logout(self) -> None:
        """Delete the local tokens and become unauthorised."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """The status JSON of the contract: never a secret."""
        raise NotImplementedError
