"""The token-endpoint limiter, with real concurrency: the cap, precedence, rate, pause."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.lifecycle.limiter import TokenLimiter


async def test_never_more_than_the_cap_in_flight() -> None:
    limiter = TokenLimiter(4)
    now_in = 0
    most = 0

    async def call() -> None:
        nonlocal now_in, most
        async with limiter.slot(urgent=False):
            now_in += 1
            most = max(most, now_in)
            await asyncio.sleep(0.01)
            now_in -= 1

    await asyncio.wait_for(asyncio.gather(*(call() for _ in range(200))), 30)
    assert most == 4
    assert limiter.most_in_flight == 4
    assert limiter.in_flight == 0


async def test_waiting_requests_go_before_background_refreshes() -> None:
    limiter = TokenLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def call(label: str, *, urgent: bool) -> None:
        async with limiter.slot(urgent=urgent):
            order.append(label)
            await gate.wait()

    first = asyncio.create_task(call("first", urgent=False))
    await asyncio.sleep(0)
    background = [asyncio.create_task(call(f"bg{i}", urgent=False)) for i in range(3)]
    await asyncio.sleep(0)
    urgent = [asyncio.create_task(call(f"req{i}", urgent=True)) for i in range(2)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *background, *urgent), 10)
    assert order == ["first", "req0", "req1", "bg0", "bg1", "bg2"]


async def test_calls_are_spaced_by_the_rate() -> None:
    limiter = TokenLimiter(10, max_per_second=20)
    started = time.monotonic()

    async def call() -> None:
        async with limiter.slot(urgent=True):
            pass

    await asyncio.wait_for(asyncio.gather(*(call() for _ in range(11))), 10)
    # 11 starts at 20/s: the last no earlier than 0.5 s after the first (lower bound only).
    assert time.monotonic() - started >= 0.45


async def test_a_busy_answer_holds_everyone_back() -> None:
    limiter = TokenLimiter(4)
    limiter.back_off(0.3)
    started = time.monotonic()
    async with limiter.slot(urgent=True):
        pass
    assert time.monotonic() - started >= 0.25


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    limiter = TokenLimiter(1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot(urgent=False):
            await gate.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(hold()) for _ in range(5)]
    await asyncio.sleep(0)
    for waiter in waiters[:3]:
        waiter.cancel()
    gate.set()
    await asyncio.wait_for(holder, 5)
    for waiter in waiters[:3]:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await asyncio.wait_for(asyncio.gather(*waiters[3:]), 5)
    assert limiter.in_flight == 0
