"""`Secret`: a string whose repr and str are masked; only `.reveal()` gives the value.

Every token, refresh token, client secret, API key and authorisation code lives in
a `Secret` from the moment it is parsed, so that a stray f-string or log call shows
`[secret]` instead of the value. Imports nothing from `proxy`.
"""

from __future__ import annotations

import hmac
from typing import final


@final
class Secret:
    """A secret value. `str()` and `repr()` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself: call only where it must leave the process."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('[secret]')"

    def __str__(self) -> str:
        return "[secret]"

    def __format__(self, spec: str) -> str:
        return "[secret]"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time: secrets are compared against attacker-supplied values.
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")
