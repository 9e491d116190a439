from __future__ import annotations

import asyncio

from gateway.lifecycle import stop_tasks, wait_event


async def test_stop_tasks_outlasts_a_swallowed_cancellation() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as some library calls do: the first cancellation is lost
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # let it reach its first await
    async with asyncio.timeout(10):
        await stop_tasks(task)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    event.set()
    assert await wait_event(event, 10)
