"""The two targets every native test runs against, one of each per test module.

"single" is one fake ComfyUI reached directly; "fleet" is the gateway with three fakes behind
it, API keys on. A script written for ComfyUI must not tell them apart, except where a comment
in a test says why the fleet differs (callers are kept apart there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.bus.natsserver import start_nats_server
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig, run_simulator
from plugins.simulator.config import DEFAULT_NODE_TYPES
from tests.e2e.conftest import running_system
from tests.native.clients import CALLERS, HOLD_CLASS, OTHER_HOLD_CLASS, Target, settle

# How long one "hold" node takes. An interrupt lands at the next node boundary, so this is
# also the most an interrupt waits; the tests never wait on it, only on the messages.
HOLD_NODE_SECONDS = 0.2


def _without(*classes: str) -> list[str]:
    return [name for name in DEFAULT_NODE_TYPES if name not in classes]


def _fleet_configs() -> dict[str, SimulatorConfig]:
    """Three fakes. Only "a" has HOLD_CLASS and only "b" OTHER_HOLD_CLASS: the balancer never
    sends a job to a server lacking a node type, so held prompts queue up on one server, as they
    do on a single ComfyUI, and the other caller's held prompt runs beside them on "b"."""
    return {
        "a": SimulatorConfig(
            node_types=_without(OTHER_HOLD_CLASS),
            class_seconds={HOLD_CLASS: HOLD_NODE_SECONDS},
        ),
        "b": SimulatorConfig(
            node_types=_without(HOLD_CLASS),
            class_seconds={OTHER_HOLD_CLASS: HOLD_NODE_SECONDS},
        ),
        "c": SimulatorConfig(node_types=_without(HOLD_CLASS, OTHER_HOLD_CLASS)),
    }


async def _single(stack: AsyncExitStack, base: Path) -> Target:
    config = SimulatorConfig(base_dir=str(base), class_seconds={HOLD_CLASS: HOLD_NODE_SECONDS})
    sim = await stack.enter_async_context(run_simulator(config))
    return Target(kind="single", url=sim.url, keys={})


async def _fleet(stack: AsyncExitStack, base: Path) -> Target:
    nats = await start_nats_server(
        port=0, store_dir=base / "nats", log_file=base / "nats-server.log"
    )
    stack.push_async_callback(nats.stop)
    keys = {caller: f"{caller}-key" for caller in CALLERS}
    settings = Settings(
        nats_url=nats.url,
        data_dir=str(base / "data"),
        port=0,
        api_keys=[f"plain:{key}" for key in keys.values()],
    )
    headers = {"Authorization": f"Bearer {keys['main']}"}
    system = await stack.enter_async_context(running_system(settings, headers))
    # All three at once: each waits for its first heartbeat, about a second.
    async with asyncio.TaskGroup() as group:
        for name, config in _fleet_configs().items():
            group.create_task(system.add_server(name, config))
    return Target(kind="fleet", url=system.url, keys=keys)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["single", "fleet"])
async def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Target]:
    """A running target for the whole module; everything it started is stopped after it."""
    base = tmp_path_factory.mktemp(f"native-{request.param}")
    async with AsyncExitStack() as stack:
        start = _single if request.param == "single" else _fleet
        yield await start(stack, base)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def idle_after(target: Target) -> AsyncIterator[None]:
    """Each test starts on an idle target, even after one that failed halfway."""
    yield
    await settle(target)
