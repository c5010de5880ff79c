"""The keyed serial executor: order per key, keys in parallel, bounds, errors, close and drain."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from runtime.keyed import ExecutorClosed, KeyedSerialExecutor, MailboxFull


def recorder(delay: float = 0.0) -> tuple[list[tuple[str, int]], dict[str, int], object]:
    """A handler that records (key, item), sleeping ``delay``; also the peak of concurrent keys."""
    seen: list[tuple[str, int]] = []
    state = {"now": 0, "peak": 0}

    async def handle(key: str, item: int) -> None:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await trio.sleep(delay)
            seen.append((key, item))
        finally:
            state["now"] -= 1

    return seen, state, handle


@asynccontextmanager
async def running(executor: KeyedSerialExecutor[str, int]) -> AsyncIterator[trio.Nursery]:
    """``executor.run()`` in a nursery for the block; cancelled once the block is done."""
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_items_of_one_key_run_in_order_one_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    seen, state, handle = recorder(delay=0.1)
    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=100, max_keys_in_flight=10, name="test")
    async with running(executor) as nursery:
        for i in range(20):
            executor.submit_nowait("a", i)
        await executor.drain()
    assert seen == [("a", i) for i in range(20)]
    assert state["peak"] == 1
    assert "a" not in executor and executor.statistics().keys == 0


async def test_keys_run_concurrently_up_to_the_bound(autojump_clock: trio.testing.MockClock) -> None:
    seen, state, handle = recorder(delay=1.0)
    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=10, max_keys_in_flight=3, name="test")
    async with running(executor) as nursery:
        for key in "abcdefg":
            executor.submit_nowait(key, 1)
            executor.submit_nowait(key, 2)
        await trio.sleep(0.5)
        stats = executor.statistics()
        assert (stats.running, stats.waiting, stats.keys) == (3, 4, 7)
        started = trio.current_time()
        await executor.drain()
        elapsed = trio.current_time() - started
    assert state["peak"] == 3
    # 7 keys x 2 items x 1 s over 3 slots, a key keeping its slot while it has items: 3 rounds of 2 s
    assert elapsed + 0.5 == pytest.approx(6.0)
    for key in "abcdefg":
        assert [item for k, item in seen if k == key] == [1, 2]


async def test_a_full_key_queue_refuses_without_touching_other_keys() -> None:
    release = trio.Event()

    async def handle(key: str, item: int) -> None:
        await release.wait()

    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=2, max_keys_in_flight=4, name="test")
    async with running(executor) as nursery:
        executor.submit_nowait("a", 0)
        await trio.testing.wait_all_tasks_blocked()   # item 0 is being handled
        executor.submit_nowait("a", 1)
        executor.submit_nowait("a", 2)
        with pytest.raises(MailboxFull):
            executor.submit_nowait("a", 3)
        executor.submit_nowait("b", 0)
        assert executor.queued("a") == 2 and executor.statistics().max_queued == 2
        release.set()
        await executor.drain()
    assert executor.statistics().handled == 4


async def test_a_failing_item_is_logged_and_the_key_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []

    async def handle(key: str, item: int) -> None:
        if item == 1:
            raise ValueError("bad item")
        seen.append(item)

    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=10, max_keys_in_flight=1, name="jobs")
    async with running(executor) as nursery:
        for i in range(3):
            executor.submit_nowait("a", i)
        await executor.drain()
    assert seen == [0, 2]
    assert executor.statistics().errors == 1
    assert any("jobs: handling an item for a failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_close_refuses_new_items_but_queued_ones_finish() -> None:
    seen, _, handle = recorder()
    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=10, max_keys_in_flight=2, name="test")
    executor.submit_nowait("a", 1)     # before run(): kept and handled once it starts
    executor.close()
    with pytest.raises(ExecutorClosed):
        executor.submit_nowait("a", 2)
    assert executor.statistics().closed
    async with running(executor) as nursery:
        await executor.drain()
    assert seen == [("a", 1)]


async def test_drain_waits_for_items_submitted_while_draining(autojump_clock: trio.testing.MockClock) -> None:
    seen, _, handle = recorder(delay=1.0)
    executor: KeyedSerialExecutor[str, int] = KeyedSerialExecutor(
        handle, queue_capacity=10, max_keys_in_flight=2, name="test")
    async with running(executor) as nursery:
        executor.submit_nowait("a", 1)

        async def late() -> None:
            await trio.sleep(0.5)
            executor.submit_nowait("b", 1)

        nursery.start_soon(late)
        await executor.drain()
    assert sorted(seen) == [("a", 1), ("b", 1)]
