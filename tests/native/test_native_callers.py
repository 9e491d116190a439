"""Interrupting, deleting, and two callers at once, on one ComfyUI and on the fleet."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import poll_until
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


async def test_queue_remaining_is_zero_only_once_history_has_the_interrupted_prompt(
    target: Target,
) -> None:
    async with target.http() as http:
        comfy = Comfy(http)
        prompt_id = await comfy.submit(hold("interrupted-polled"))

        async def running() -> bool:
            held, _ = await comfy.queue()
            return [item[1] for item in held] == [prompt_id]

        await poll_until(running, "the held prompt running")
        await comfy.interrupt(prompt_id)

        async def in_history() -> bool:
            # The count first: if history still lacks the prompt after it, the prompt had not
            # ended in the server's eyes when the count was taken, so it must be counted.
            remaining = await comfy.queue_remaining()
            if await comfy.history(prompt_id) is not None:
                return True
            assert remaining >= 1, "queue_remaining was 0 while the history was still empty"
            return False

        # Asked back to back by a few pollers at once: the gap this looks for lasts a few
        # milliseconds.
        await asyncio.gather(
            *(poll_until(in_history, f"history of {prompt_id}", every=0) for _ in range(4))
        )
        entry = await comfy.history(prompt_id)

    assert entry is not None
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


async def test_clearing_the_queue_leaves_the_running_prompt_running(target: Target) -> None:
    client_id = f"clear-{uuid.uuid4().hex}"
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        running_id = await comfy.submit(hold("clear-running"), client_id)
        pending_ids = [await comfy.submit(hold("clear-pending", 2), client_id) for _ in range(2)]
        await ws.wait_for(runs(running_id, "2"), "the first prompt running")
        before = len(ws.messages)
        await comfy.queue_action({"clear": True})
        running, pending = await comfy.queue()
        remaining = await comfy.queue_remaining()

        def one_left(message: dict[str, Any]) -> bool:
            return (
                message["type"] == "status"
                and message["data"]["status"]["exec_info"]["queue_remaining"] == 1
                and any(message is later for later in ws.messages[before:])
            )

        await ws.wait_for(one_left, "a status of one prompt left, after the clear")
        # Still running: later nodes start after the clear.
        await ws.wait_for(runs(running_id, "4"), "a later node of the running prompt")
        await comfy.interrupt(running_id)
        check_interrupted(await ws.done(running_id))
        cleared = [await comfy.history(prompt_id) for prompt_id in pending_ids]

    assert [item[1] for item in running] == [running_id] and pending == [], (running, pending)
    assert remaining == 1
    assert cleared == [None, None], "a cleared prompt ran"
    assert ws.prompt_ids() == {running_id}


# Only the fleet runs two prompts of one caller at once.
@pytest.mark.parametrize("target", ["fleet"], indirect=True)
async def test_prompts_running_at_once_show_as_one_running(target: Target) -> None:
    client_id = f"at-once-{uuid.uuid4().hex}"
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        # Only "a" has one hold class and only "b" the other: they run side by side.
        on_a = await comfy.submit(hold("at-once-a"), client_id)
        on_b = await comfy.submit(hold("at-once-b", slow_class=OTHER_HOLD_CLASS), client_id)
        for prompt_id in (on_a, on_b):
            await ws.wait_for(runs(prompt_id, "3"), f"{prompt_id} running")
        running, pending = await comfy.queue()
        remaining = await comfy.queue_remaining()
        for prompt_id in (on_a, on_b):
            await comfy.interrupt(prompt_id)
            check_interrupted(await ws.done(prompt_id))

    # The one that started first is shown running, as if the other waited for it.
    assert len(running) == 1 and len(pending) == 1, (running, pending)
    assert {running[0][1], pending[0][1]} == {on_a, on_b}
    assert remaining == 2
