"""Test support: a real clock the test can step (a step of the wall clock, a suspend)."""

from __future__ import annotations

from collections.abc import Callable


class Shifted:
    """A real clock plus an offset the test changes: a step, or the hour a suspend took."""

    def __init__(self, base: Callable[[], float]) -> None:
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self.base() + self.offset
