"""Interrupting, deleting, and two callers at once, on one ComfyUI and on the fleet."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.native.clients import (
    HOLD_CLASS,
    OTHER_HOLD_CLASS,
    Comfy,
    Socket,
    Target,
    hold,
    of_prompt,
    socket,
    tiny,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


def runs(prompt_id: str, node: str | None = None) -> Callable[[dict[str, Any]], bool]:
    """`executing` of that prompt: for `node`, or for any node when None."""

    def check(message: dict[str, Any]) -> bool:
        data = message["data"]
        return (
            message["type"] == "executing"
            and of_prompt(message, prompt_id)
            and data["node"] is not None
            and (node is None or data["node"] == node)
        )

    return check


def check_interrupted(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The README's ending of an interrupted prompt; the execution_interrupted message.

    `executing{node}` → `execution_interrupted` naming that node → `status` → `executing` null,
    and no `execution_success`.
    """
    names = [m["type"] for m in messages]
    assert "execution_success" not in names, names
    last = [m for m in messages if m["type"] not in ("status", "progress_state")][-3:]
    assert [m["type"] for m in last] == ["executing", "execution_interrupted", "executing"], names
    assert last[1]["data"]["node_id"] == last[0]["data"]["node"], last
    assert last[2]["data"]["node"] is None
    assert "status" in names[names.index("execution_interrupted") : -1], names
    return last[1]


async def test_interrupting_the_running_prompt(target: Target) -> None:
    client_id = f"interrupt-{uuid.uuid4().hex}"
    graph = hold("interrupted")
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        prompt_id = await comfy.submit(graph, client_id)
        await ws.wait_for(runs(prompt_id, "2"), "the first held node running")
        # Naming a prompt that is not running does nothing: two nodes later it still runs.
        await comfy.interrupt(f"not-running-{uuid.uuid4().hex}")
        await ws.wait_for(runs(prompt_id, "4"), "a later node running")
        assert not any(m["type"] == "execution_interrupted" for m in ws.messages)
        await comfy.interrupt(prompt_id)
        messages = await ws.done(prompt_id)
        entry = await comfy.history(prompt_id)

    interrupted = check_interrupted(messages)
    assert interrupted["data"]["node_type"] == HOLD_CLASS
    assert {"1", "2", "3", "4"} <= set(interrupted["data"]["executed"])
    assert entry is not None, "no history right after executing null"
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert entry["outputs"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["status"]["messages"][-1][1]["node_id"] == interrupted["data"]["node_id"]


async def _own_view(comfy: Comfy, mine: set[str], theirs: set[str]) -> None:
    running, pending = await comfy.queue()
    queued = {item[1] for item in running + pending}
    history = set(await comfy.all_history())
    assert not queued & theirs, f"another caller's prompts in /queue: {queued & theirs}"
    assert not history & theirs, f"another caller's prompts in /history: {history & theirs}"
    assert queued | history >= mine


def _only_hears(sock: Socket, prompt_ids: set[str]) -> None:
    heard = sock.prompt_ids()
    assert heard <= prompt_ids, f"{sock.client_id} heard of {heard - prompt_ids}"


async def test_two_callers_each_keep_to_their_own_prompts(target: Target) -> None:
    alice_id, bob_id = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
    async with (
        socket(target, alice_id, "alice") as alice_ws,
        socket(target, bob_id, "bob") as bob_ws,
        target.http("alice") as alice_http,
        target.http("bob") as bob_http,
    ):
        alice, bob = Comfy(alice_http), Comfy(bob_http)
        # Bob first: on one ComfyUI his prompts then run before alice's, which her global
        # interrupt below would otherwise cut. On the fleet his held ones run on "b" beside
        # hers, the first long enough to be running while she interrupts, the second pending.
        bob_ids = [
            await bob.submit(hold("bob", 10, OTHER_HOLD_CLASS), bob_id),
            await bob.submit(hold("bob", 2, OTHER_HOLD_CLASS), bob_id),
            await bob.submit(tiny("bob"), bob_id),
        ]
        first, deleted, last = [await alice.submit(hold("alice"), alice_id) for _ in range(3)]
        await alice_ws.wait_for(runs(first), "alice's first prompt running")
        running, pending = await alice.queue()
        assert [item[1] for item in running] == [first], (first, running, pending)
        assert {deleted, last} <= {item[1] for item in pending}, pending

        if target.fleet:
            # A single ComfyUI shows everyone's queue and history to everyone, and obeys
            # anyone's delete and interrupt; the fleet keeps each API key to its own prompts.
            await bob_ws.wait_for(runs(bob_ids[0]), "bob's first prompt running")
            await _own_view(alice, {first, deleted, last}, set(bob_ids))
            await _own_view(bob, set(bob_ids), {first, deleted, last})
            await alice.queue_action({"delete": bob_ids[1:]})
            await alice.interrupt(bob_ids[0])

        await alice.queue_action({"delete": [deleted]})
        await alice.interrupt(first)
        check_interrupted(await alice_ws.done(first))
        await alice_ws.wait_for(runs(last), "alice's last prompt running")
        await alice.interrupt()
        check_interrupted(await alice_ws.done(last))

        for prompt_id in bob_ids:
            names = [m["type"] for m in await bob_ws.done(prompt_id)]
            assert "execution_success" in names, f"bob's {prompt_id}: {names}"
            entry = await bob.history(prompt_id)
            assert entry is not None and entry["status"]["status_str"] == "success", entry
        assert await alice.history(deleted) is None, "a deleted prompt must never run"
        if target.fleet:
            await _own_view(alice, {first, last}, set(bob_ids))
            await _own_view(bob, set(bob_ids), {first, deleted, last})

    _only_hears(alice_ws, {first, last})
    _only_hears(bob_ws, set(bob_ids))
