"""What the forwarder asks for the `Authorization` header, and the API-key source.

`forward` depends only on `CredentialSource`; `tokens.TokenManager` implements it
for OAuth, `ApiKeySource` for Pleo's standalone API keys.
"""

from __future__ import annotations

import base64
from typing import Protocol

from proxy.secret import Secret


class CredentialSource(Protocol):
    async def authorization(self, *, replayable: bool = True) -> Secret:
        """The full `Authorization` header value to send now.

        `replayable=False` means the request cannot be replayed after a 401 (its body
        is too large to keep), so a token close to expiry is refreshed first.
        Raises a ProxyError (e.g. ReauthorizationRequired) when there is none.
        """

    async def on_rejected(self, sent: Secret) -> Secret | None:
        """Pleo answered 401 to `sent`: the value to replay with once, or None."""

    async def stored_since(self, sent: Secret) -> Secret | None:
        """A value another process stored after `sent` was handed out, found without
        refreshing (None: there is none). Asked when the replay itself got a 401."""


class ApiKeySource:
    """Pleo standalone API key: HTTP Basic with the key as user and an empty password."""

    def __init__(self, api_key: Secret) -> None:
        raw = base64.b64encode(f"{api_key.reveal()}:".encode()).decode()
        self._header = Secret(f"Basic {raw}")

    async def authorization(self, *, replayable: bool = True) -> Secret:
        return self._header

    async def on_rejected(self, sent: Secret) -> Secret | None:
        # A rejected API key cannot be renewed by us: the 401 goes back as it is.
        return None

    async def stored_since(self, sent: Secret) -> Secret | None:
        return None
