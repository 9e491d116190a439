"""A prompt taken by one gateway is seen and followed through another gateway of the system.

Scripts behind a load balancer may post a prompt to one gateway and poll, download or listen on
another: every gateway shows the same queue, history, files and websocket messages. Only the
fleet is meant here; a single ComfyUI has nothing like it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, running_system
from tests.helpers import poll_until
from tests.native.clients import (
    HOLD_CLASS,
    Comfy,
    Target,
    hold,
    inverted,
    png_facts,
    same_colour,
    socket,
    tiny,
)
from tests.native.test_native_callers import check_interrupted
from tests.native.test_native_clients import colour_of, fresh_run, steps

KEYS = {"main": "main-key", "other": "other-key"}
# A held node's duration: the held prompt runs until it is interrupted, so this only bounds
# how long the interrupt takes to land (at the next node boundary).
HOLD_NODE_SECONDS = 0.1


@pytest.fixture(autouse=True)
def idle_after() -> None:
    """The package's fixture of this name idles its shared targets; this module has none."""


@pytest.fixture
async def two_gateways(settings: Settings) -> AsyncIterator[tuple[System, Target, Target]]:
    """One fake ComfyUI behind two gateways with API keys on: (system, first, second)."""
    keyed = msgspec.structs.replace(settings, api_keys=[f"plain:{key}" for key in KEYS.values()])
    headers = {"Authorization": f"Bearer {KEYS['main']}"}
    async with running_system(keyed, headers) as system:
        await system.add_server("a", SimulatorConfig(class_seconds={HOLD_CLASS: HOLD_NODE_SECONDS}))
        second = await system.start_gateway()
        yield (
            system,
            Target(kind="fleet", url=system.url, keys=KEYS),
            Target(kind="fleet", url=second, keys=KEYS),
        )


def _ids(items: list[list[object]]) -> list[object]:
    return [item[1] for item in items]


async def test_a_prompt_taken_by_one_gateway_is_followed_through_another(
    two_gateways: tuple[System, Target, Target],
) -> None:
    _, first, second = two_gateways
    client_id = f"two-gateways-{uuid.uuid4().hex}"
    held_graph, graph = hold("elsewhere-held"), tiny("elsewhere")
    async with (
        socket(second, client_id) as ws,
        first.http() as first_http,
        second.http() as second_http,
        second.http("other") as other_http,
    ):
        taker, follower, other = Comfy(first_http), Comfy(second_http), Comfy(other_http)
        # Both through the first gateway; the one server runs one job at a time, so the
        # tiny prompt waits behind the held one.
        held = await taker.submit(held_graph, client_id)
        prompt_id = await taker.submit(graph, client_id)

        async def both_show_the_queue() -> bool:
            # The second gateway may tell of the start first: its socket relays it as it comes,
            # the first learns it from the job's record a moment later.
            for comfy in (follower, taker):
                running, pending = await comfy.queue()
                if _ids(running) != [held] or _ids(pending) != [prompt_id]:
                    return False
            return True

        await poll_until(both_show_the_queue, "the held prompt running on both gateways")
        taker_running, taker_pending = await taker.queue()
        follower_running, follower_pending = await follower.queue()
        # The same items, numbers included, whichever gateway is asked.
        assert (follower_running, follower_pending) == (taker_running, taker_pending)
        assert follower_pending[0][2] == graph and follower_pending[0][3]["client_id"] == client_id
        assert await follower.queue_remaining() == 2
        assert await other.queue() == ([], []), "another caller sees the prompts"

        # Interrupted through the second gateway; the tiny prompt runs after it.
        await follower.interrupt(held)
        held_messages = await ws.done(held)
        messages = await ws.done(prompt_id)
        # The done signal comes once history has the entry, on this gateway too.
        entry = await follower.history(prompt_id)
        assert entry is not None, "no history on the second gateway right after executing null"
        assert await taker.history(prompt_id) == entry
        held_entry = await follower.history(held)
        assert held_entry is not None and held_entry == await taker.history(held)
        files = entry["outputs"]["3"]["images"]
        images = [await follower.view(ref) for ref in files]
        assert images == [await taker.view(ref) for ref in files]
        assert await other.history(prompt_id) is None
        reply = await other_http.get("/view", params=files[0])
        assert reply.status_code == 404, "another caller downloads the prompt's output"

    check_interrupted(held_messages)
    assert held_entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert steps(messages) == fresh_run(["1", "2", "3"], {"3"})
    executed = next(m for m in messages if m["type"] == "executed")
    assert executed["data"]["output"] == entry["outputs"]["3"]
    assert entry["prompt"][1:3] == [prompt_id, graph]
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("success", True)
    assert images, "history lists no image"
    for image in images:
        width, height, pixel = png_facts(image)
        assert (width, height) == (64, 64)
        assert same_colour(pixel, inverted(colour_of(graph))), pixel
