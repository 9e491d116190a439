"""One log sink per system: a second one stands by and never splits the stream; it takes over
when the first stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.contract import NodeCachedData, Subjects
from gateway.bus.events import EventPublisher
from gateway.bus.lease import lease_held
from gateway.logsink.paths import prompts_dir
from gateway.logsink.sink import LEASE_KEY, run_logsink
from gateway.settings import Settings
from tests.helpers import poll_until
from tests.logsink.jobs import FAST


def _at(settings: Settings, data_dir: Path) -> Settings:
    return msgspec.structs.replace(settings, data_dir=str(data_dir))


def _lines(data_dir: Path) -> int:
    folder = prompts_dir(data_dir)
    if not folder.is_dir():
        return 0
    return sum(len(path.read_text().splitlines()) for path in folder.iterdir())


async def test_a_second_sink_stands_by_and_takes_over_when_the_first_stops(
    nc: Client, js: JetStreamContext, subjects: Subjects, settings: Settings, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_stop, second_stop = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(
        run_logsink(
            msgspec.structs.replace(settings, data_dir=str(first_dir)), first_stop, config=FAST
        )
    )
    second: asyncio.Task[None] | None = None
    try:
        await poll_until(
            lambda: lease_held(js, subjects.balancer_bucket, LEASE_KEY), "the first sink leads"
        )
        second = asyncio.create_task(
            run_logsink(
                msgspec.structs.replace(settings, data_dir=str(second_dir)),
                second_stop,
                config=FAST,
            )
        )
        publisher = EventPublisher(js, subjects)
        for n in range(20):
            await publisher.emit(f"job{n % 4}", NodeCachedData(node_ids=[str(n)]))
        await poll_until(lambda: _count_is(first_dir, 20), "every event in the first sink's files")
        assert _lines(second_dir) == 0  # the standby took none of them
        first_stop.set()
        await asyncio.wait_for(first, 90)
        for n in range(20, 30):
            await publisher.emit(f"job{n % 4}", NodeCachedData(node_ids=[str(n)]))
        await poll_until(lambda: _count_is(second_dir, 10), "the standby took over", within=30)
        assert _lines(first_dir) == 20
    finally:
        first_stop.set()
        second_stop.set()
        await asyncio.gather(first, *([second] if second else []), return_exceptions=True)


async def _count_is(data_dir: Path, count: int) -> bool:
    return _lines(data_dir) == count
