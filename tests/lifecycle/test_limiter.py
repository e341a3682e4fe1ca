"""The token-endpoint limiter, with real concurrency: the cap, precedence, promotion, rate,
pause."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.lifecycle.limiter import Priority, TokenLimiter


async def test_never_more_than_the_cap_in_flight() -> None:
    limiter = TokenLimiter(4)
    now_in = 0
    most = 0

    async def call() -> None:
        nonlocal now_in, most
        async with limiter.slot(Priority(urgent=False)):
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
        async with limiter.slot(Priority(urgent=urgent)):
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
        async with limiter.slot(Priority(urgent=True)):
            pass

    await asyncio.wait_for(asyncio.gather(*(call() for _ in range(11))), 10)
    # 11 starts at 20/s: the last no earlier than 0.5 s after the first (lower bound only).
    assert time.monotonic() - started >= 0.45


async def test_a_busy_answer_holds_everyone_back() -> None:
    limiter = TokenLimiter(4)
    limiter.back_off(0.3)
    started = time.monotonic()
    async with limiter.slot(Priority(urgent=True)):
        pass
    assert time.monotonic() - started >= 0.25


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    limiter = TokenLimiter(1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot(Priority(urgent=False)):
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


async def test_a_promoted_waiter_goes_before_earlier_background_waiters() -> None:
    limiter = TokenLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def call(label: str, priority: Priority) -> None:
        async with limiter.slot(priority):
            order.append(label)
            await gate.wait()

    first = asyncio.create_task(call("first", Priority(urgent=False)))
    await asyncio.sleep(0)
    priorities = [Priority(urgent=False) for _ in range(100)]
    background = [asyncio.create_task(call(f"bg{i}", p)) for i, p in enumerate(priorities)]
    await asyncio.sleep(0)
    priorities[90].promote()  # a request came to wait for the 91st background call
    urgent = asyncio.create_task(call("req", Priority(urgent=True)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *background, urgent), 10)
    rest = [f"bg{i}" for i in range(100) if i != 90]
    assert order == ["first", "bg90", "req", *rest], "promoted: among the urgent, in turn"
    assert limiter.most_in_flight == 1
    assert limiter.in_flight == 0


async def test_promoting_a_granted_or_cancelled_call_changes_nothing() -> None:
    limiter = TokenLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()
    granted, cancelled = Priority(urgent=False), Priority(urgent=False)

    async def call(label: str, priority: Priority) -> None:
        async with limiter.slot(priority):
            order.append(label)
            await gate.wait()

    holder = asyncio.create_task(call("holder", granted))
    await asyncio.sleep(0)
    gone = asyncio.create_task(call("gone", cancelled))
    waiting = [asyncio.create_task(call(f"bg{i}", Priority(urgent=False))) for i in range(3)]
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    granted.promote()
    cancelled.promote()
    assert limiter.in_flight == 1, "the holder keeps its one slot; no second one is granted"
    gate.set()
    await asyncio.wait_for(asyncio.gather(holder, *waiting), 10)
    assert order == ["holder", "bg0", "bg1", "bg2"]
    assert limiter.most_in_flight == 1
    assert limiter.in_flight == 0


async def test_a_call_with_a_promoted_priority_waits_as_urgent() -> None:
    limiter = TokenLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()
    retried = Priority(urgent=False)
    retried.promote()  # promoted between two attempts of one refresh

    async def call(label: str, priority: Priority) -> None:
        async with limiter.slot(priority):
            order.append(label)
            await gate.wait()

    first = asyncio.create_task(call("first", Priority(urgent=False)))
    await asyncio.sleep(0)
    background = asyncio.create_task(call("bg", Priority(urgent=False)))
    again = asyncio.create_task(call("again", retried))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, background, again), 10)
    assert order == ["first", "again", "bg"]
