"""What a socket hears besides its own prompts' messages, against one ComfyUI and the fleet.

Binary TEXT frames go to every socket (`ws_two_clients_heavy.jsonl`), and a socket that joins a
running prompt under its clientId hears where the prompt is and the rest of it
(`ws_late_join.jsonl`, client A2_same_clientId).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.native.clients import (
    Comfy,
    Socket,
    Target,
    hold,
    image_size,
    is_done,
    of_prompt,
    size_text,
    socket,
    tiny,
)
from tests.native.test_native_clients import fresh_run, steps

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOLD_NODES = 12


def _prompt_messages(sock: Socket, prompt_id: str) -> list[dict[str, Any]]:
    return [m for m in sock.messages if of_prompt(m, prompt_id)]


async def test_text_frames_go_to_every_socket_of_the_caller(target: Target) -> None:
    ids = {name: f"{name}-{uuid.uuid4().hex}" for name in ("a", "b", "other")}
    async with (
        socket(target, ids["a"]) as a,
        socket(target, ids["b"]) as b,
        socket(target, ids["other"], caller="alice") as other,
        target.http() as http,
        target.http("alice") as alice_http,
    ):
        comfy = Comfy(http)
        own = await comfy.submit(image_size("text", 8), ids["a"])
        anonymous = await comfy.submit(image_size("text", 12))
        await a.done(own)
        for sock in (a, b):
            await sock.wait_binary(size_text("2", 8), "the TEXT frame of a's prompt")
            await sock.wait_binary(size_text("2", 12), "the TEXT frame of the prompt without id")
        # A socket is sent frames in order: what the other caller's socket was sent of those
        # two came before the frame of its own prompt, taken after them, and what a and b
        # were sent of that one before the frame of a last prompt of theirs.
        theirs = await Comfy(alice_http).submit(image_size("text", 16), ids["other"])
        await other.done(theirs)
        await other.wait_binary(size_text("2", 16), "the TEXT frame of its own prompt")
        last = await comfy.submit(image_size("text", 20))
        for sock in (a, b):
            await sock.wait_binary(size_text("2", 20), "the TEXT frame of the last prompt")
        await comfy.wait_history(anonymous)
        await comfy.wait_history(last)

    mine = [size_text("2", 8), size_text("2", 12)]
    # ComfyUI sends TEXT frames to every socket; the fleet only to the prompt's caller's.
    shared = [] if target.fleet else mine
    before = other.binary[: other.binary.index(size_text("2", 16))]
    assert sorted(before) == sorted(shared)
    if target.fleet:
        assert other.binary == [size_text("2", 16)]
    theirs_seen = [] if target.fleet else [size_text("2", 16)]
    for sock in (a, b):
        assert sorted(sock.binary[:2]) == sorted(mine), sock.client_id
        assert sock.binary[2:] == [*theirs_seen, size_text("2", 20)], sock.client_id
    assert not _prompt_messages(b, own), "b heard a's prompt"


def _is_running(prompt_id: str, node: str) -> Any:
    return lambda m: (
        m["type"] == "executing" and of_prompt(m, prompt_id) and m["data"]["node"] == node
    )


@pytest.mark.parametrize("first_open", [False, True], ids=["after-closing", "beside-the-first"])
async def test_a_socket_rejoining_a_running_prompt_hears_the_rest_of_it(
    target: Target, first_open: bool
) -> None:
    client_id = f"rejoin-{uuid.uuid4().hex}"
    graph = hold("rejoin", nodes=HOLD_NODES)
    nodes = list(graph)
    async with target.http() as http:
        comfy = Comfy(http)
        async with socket(target, client_id) as first:
            prompt_id = await comfy.submit(graph, client_id)
            await first.wait_for(_is_running(prompt_id, "3"), "the third node running")
            if first_open:
                async with (
                    socket(target, f"new-{uuid.uuid4().hex}") as newcomer,
                    socket(target, client_id) as again,
                ):
                    await again.done(prompt_id)
                    if target.fleet:
                        # ComfyUI sends the older socket nothing more at all; the fleet still
                        # sends it `status` and broadcasts, such as the progress of a prompt
                        # without a client id, which comes after anything sent before it.
                        marker = await comfy.submit(tiny("marker"))
                        await first.wait_for(
                            lambda m: of_prompt(m, marker) and m["type"] == "progress_state",
                            "the marker's progress",
                        )
                        await comfy.wait_history(marker)
        if not first_open:
            async with (
                socket(target, f"new-{uuid.uuid4().hex}") as newcomer,
                socket(target, client_id) as again,
            ):
                await again.done(prompt_id)

    # As in the recording: `status` with sid, `executing` {node} alone, then the prompt's
    # messages from there on, `progress_state` still carrying every node started so far.
    joined = again.messages[1]
    assert list(joined) == ["type", "data"] and joined["type"] == "executing", joined
    assert list(joined["data"]) == ["node"], joined
    node = joined["data"]["node"]
    expected = fresh_run(nodes, {nodes[-1]})
    rest = expected[expected.index(("executing", node)) + 1 :]
    end = again.messages.index(await again.wait_for(is_done(prompt_id), "done"))
    told = steps([m for m in again.messages[2 : end + 1] if of_prompt(m, prompt_id)])
    # A socket joining between two nodes comes after the first one's last progress_state.
    assert told in (rest, rest[1:]), f"joined at {node}: {told}"
    assert told[-1] == ("executing", None)
    assert node != nodes[-1], "joined too late to tell"
    # Only `status` for a socket of another clientId.
    heard = [
        m for m in newcomer.messages if of_prompt(m, prompt_id) or "prompt_id" not in m["data"]
    ]
    assert {m["type"] for m in heard} == {"status"}, heard
    if first_open:
        # The older socket of the clientId hears no more of it.
        assert not any(is_done(prompt_id)(m) for m in first.messages)
