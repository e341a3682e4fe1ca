"""Test support: a real sandbox (fake Pleo) on an ephemeral loopback port, and its knobs.

Other test modules use it with `from tests.sandboxes import sandbox  # noqa: F401`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.sandbox import RunningSandbox, SandboxSettings, start_sandbox

__all__ = [
    "RunningSandbox",
    "get_grants",
    "get_stats",
    "reset_stats",
    "revoke_all",
    "revoke_subject",
    "sandbox",
    "set_knobs",
]

# Control calls are local and tiny; a hung sandbox should fail the test, not stall it.
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    """A sandbox with default settings, closed after the test."""
    running = await start_sandbox(SandboxSettings())
    try:
        yield running
    finally:
        await running.close()


async def _control(url: str, method: str, path: str, body: object = None) -> Any:
    async with (
        aiohttp.ClientSession(timeout=CONTROL_TIMEOUT) as session,
        session.request(method, f"{url}/_sandbox/{path}", json=body) as response,
    ):
        answer = await response.json()
        if response.status != 200:
            raise AssertionError(f"sandbox {path}: {response.status} {answer}")
        return answer


async def set_knobs(url: str, **knobs: object) -> dict[str, Any]:
    """Change sandbox knobs over HTTP (works for a sandbox in any process); returns all knobs."""
    answer: dict[str, Any] = await _control(url, "POST", "knobs", knobs)
    return answer


async def get_stats(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = await _control(url, "GET", "stats")
    return answer


async def reset_stats(url: str) -> None:
    await _control(url, "POST", "reset-stats")


async def revoke_all(url: str) -> None:
    """Revoke every grant, as if the user disconnected the app in Pleo."""
    await _control(url, "POST", "revoke")


async def revoke_subject(url: str, subject: str) -> int:
    """Revoke only the grants of one company (its subject URN); returns how many."""
    answer: dict[str, Any] = await _control(url, "POST", "revoke", {"subject": subject})
    revoked: int = answer["revoked_grants"]
    return revoked


async def get_grants(url: str) -> list[dict[str, Any]]:
    """Every grant, oldest first: id, subject, company_name, revoked, refreshes, reuse_detected."""
    answer: dict[str, Any] = await _control(url, "GET", "grants")
    grants: list[dict[str, Any]] = answer["grants"]
    return grants
