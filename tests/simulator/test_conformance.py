"""The simulator against every recorded scenario, replayed in recording order on one server.

The recordings were made one after the other on a single ComfyUI process, so prompt numbers,
file counters, the cache and the history carry over from one scenario to the next. Replaying
them in the same order on one simulator makes all of that comparable exactly. Running a single
test replays the scenarios before it first (without checking them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from transcripts import SESSION, Replay, replay_config

from plugins.simulator import Simulator, run_simulator

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Session:
    def __init__(self, simulator: Simulator, base_dir: Path) -> None:
        self.simulator = simulator
        self.replay = Replay(
            simulator.url,
            base_dir,
            lambda: simulator.engine.next_number,
            hold_setup=simulator.hold_setup,
        )
        self.done: set[str] = set()

    async def check(self, name: str) -> list[str]:
        for earlier in SESSION[: SESSION.index(name)]:
            if earlier not in self.done:
                await self.replay.play(earlier, check=False)
                self.done.add(earlier)
        self.done.add(name)
        return await self.replay.play(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Session]:
    base = tmp_path_factory.mktemp("conformance")
    async with run_simulator(replay_config(base)) as simulator:
        yield Session(simulator, simulator.folders.output.parent)


@pytest.mark.parametrize("scenario", SESSION)
async def test_scenario_matches_recording(session: Session, scenario: str) -> None:
    problems = await session.check(scenario)
    assert not problems, "\n".join(problems)
