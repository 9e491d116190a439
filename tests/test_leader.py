from __future__ import annotations

import asyncio

from nats.js import JetStreamContext

from gateway.leader import hold_leadership


async def test_one_leader_at_a_time_and_a_clean_handover(js: JetStreamContext) -> None:
    kv = await js.key_value("comfy_balancer")
    leading: list[str] = []
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def work_of(name: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            leading.append(name)
            assert len(leading) == 1, leading
            await events.put(("lead", name))
            try:
                await asyncio.Event().wait()
            finally:
                leading.remove(name)

        return work

    stops = {name: asyncio.Event() for name in ("a", "b")}
    tasks = {
        name: asyncio.create_task(
            hold_leadership(kv, name, work_of(name), stops[name], renew_every=0.05)
        )
        for name in stops
    }
    try:
        async with asyncio.timeout(10):
            _, first = await events.get()
            other = "b" if first == "a" else "a"
            stops[first].set()
            await tasks[first]
            assert await events.get() == ("lead", other)
    finally:
        for name in stops:
            stops[name].set()
        await asyncio.gather(*tasks.values())


async def test_a_failing_leader_gives_the_lease_up(js: JetStreamContext) -> None:
    kv = await js.key_value("comfy_balancer")
    runs: asyncio.Queue[str] = asyncio.Queue()

    async def broken() -> None:
        await runs.put("broken")
        raise RuntimeError("the leader's work broke")

    async def healthy() -> None:
        await runs.put("healthy")
        await asyncio.Event().wait()

    stop = asyncio.Event()
    first = asyncio.create_task(hold_leadership(kv, "broken", broken, stop, renew_every=0.05))
    second = None
    try:
        async with asyncio.timeout(10):
            assert await runs.get() == "broken"
            second = asyncio.create_task(
                hold_leadership(kv, "healthy", healthy, stop, renew_every=0.05)
            )
            while await runs.get() != "healthy":
                pass
    finally:
        stop.set()
        await asyncio.gather(first, *([second] if second else []))
