"""Following one prompt on ComfyUI until it leaves: its messages, polling, stops and time-outs.

The socket's messages become node events as they come; silence, a poll tick or the prompt's
end is checked against ComfyUI's history and queue. Nothing waits without a deadline: a bound
on the wait for ComfyUI to start the prompt, the job's timeout once it runs, a grace for an
unreachable ComfyUI and a wait for a stop to be confirmed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

from gateway.bus.contract import (
    NodeCachedData,
    NodeImageData,
    NodeOutputData,
    NodeProgressData,
    NodeStartedData,
)
from plugins.comfyui.attempt import Attempt, Stop
from plugins.comfyui.client import ComfyError
from plugins.comfyui.messages import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    HistoryEntry,
    Progress,
    WsMessage,
)
from plugins.comfyui.progress import Item, Lost, Nudge, StoredImage, Watch

log = logging.getLogger(__name__)


@dataclass
class Found:
    """Where the prompt is on ComfyUI; with its history once it is done."""

    kind: Literal["done", "running", "pending", "absent"]
    raw: dict[str, Any] | None = None
    entry: HistoryEntry | None = None


@dataclass
class End:
    """How following the prompt ended."""

    kind: Literal["done", "dequeued", "stuck", "unreachable", "vanished"]
    found: Found | None = None
    reason: str = ""


async def lookup(attempt: Attempt) -> Found:
    """Where the prompt is on ComfyUI: finished (with its history), running, pending, absent."""
    client = attempt.ctx.client
    found = await client.history(attempt.prompt_id)
    if found is not None:
        return Found("done", found[0], found[1])
    position = (await client.queue()).position(attempt.prompt_id)
    if position is None:
        return Found("absent")
    if position == 0:
        return Found("running")
    log.debug("job %s: pending on ComfyUI at position %d", attempt.job.job_id, position)
    return Found("pending")


async def stop_on_comfy(
    attempt: Attempt,
) -> Literal["dequeued", "interrupting", "gone", "unknown"]:
    """Dequeue the prompt if pending, interrupt it if (and only if) it is the running one."""
    client = attempt.ctx.client
    prompt_id = attempt.prompt_id
    job_id = attempt.job.job_id
    try:
        queue = await client.queue()
        if prompt_id in queue.pending_ids():
            await client.delete_pending([prompt_id])
            queue = await client.queue()
            if prompt_id not in queue.running_ids() + queue.pending_ids():
                if await client.history(prompt_id) is None:
                    log.info("job %s: removed from ComfyUI's queue", job_id)
                    return "dequeued"
                return "gone"
        if prompt_id in queue.running_ids():
            # ComfyUI checks the id: this never interrupts another job's prompt.
            await client.interrupt(prompt_id)
            log.info("job %s: interrupt sent to ComfyUI", job_id)
            return "interrupting"
    except ComfyError as exc:
        log.warning("job %s: could not stop the prompt on ComfyUI: %s", job_id, exc)
        return "unknown"
    return "gone"


async def follow(attempt: Attempt, watch: Watch) -> End:
    """Follow the prompt until it leaves ComfyUI (or must be given up)."""
    loop = asyncio.get_running_loop()
    options = attempt.ctx.options
    stop_seen = False
    ending = False
    absent = 0
    unreachable_since: float | None = None
    give_up_at = math.inf
    while True:
        now = loop.time()
        if not attempt.started and attempt.stop is None and now >= attempt.start_by:
            # Queued behind work that does not move (or a stuck ComfyUI): another server
            # may run it.
            wait_s = options.start_wait_s
            log.warning("job %s: ComfyUI did not start it within %g s", attempt.job.job_id, wait_s)
            attempt.request_stop(
                Stop("hand_back", f"ComfyUI did not start the prompt within {wait_s:g} s")
            )
        if attempt.stop is not None and not stop_seen:
            stop_seen = True
            if await stop_on_comfy(attempt) == "dequeued":
                return End("dequeued")
            give_up_at = min(give_up_at, now + options.stop_wait_s)
        if not attempt.timed_out and now >= attempt.deadline:
            # Past the deadline the job has failed, whatever ComfyUI does next (see
            # conclusion.from_history).
            attempt.timed_out = True
            log.warning("job %s: timed out after %g s", attempt.job.job_id, attempt.timeout)
            if await stop_on_comfy(attempt) == "dequeued":
                return End("dequeued")
            give_up_at = min(give_up_at, now + options.stop_wait_s)
        if now >= give_up_at:
            return End("stuck")
        if ending:
            wait = 0.1
        elif watch.live:
            wait = options.silence_s
        else:
            wait = options.poll_s
        item = await _next(watch, max(0.0, min(wait, _next_limit(attempt, give_up_at) - now)))
        if isinstance(item, Lost | Nudge):
            continue
        if isinstance(item, StoredImage):
            output = item.output
            attempt.events.soon(
                NodeImageData(node_id=output.node_id, index=output.index or 0, output=output)
            )
            continue
        if item is not None:
            said = _on_message(attempt, item)
            if said is None:
                continue
            if said == "ending" and not ending:
                # execution_success/error/interrupted: /history can still be empty now;
                # `executing` null follows within milliseconds and is the real end.
                ending = True
                continue
            ending = True
        # Silence, a polling tick, or the prompt just ended: ask ComfyUI.
        try:
            found = await lookup(attempt)
        except ComfyError as exc:
            now = loop.time()
            unreachable_since = now if unreachable_since is None else unreachable_since
            if now - unreachable_since >= options.unreachable_grace_s:
                return End("unreachable", reason=str(exc))
            continue
        unreachable_since = None
        if found.kind == "done":
            if watch.live and not ending:
                # Open, yet it missed the end of our prompt: that socket is deaf.
                watch.missed = True
                attempt.ctx.follower.reconnect(f"it missed the end of prompt {attempt.prompt_id}")
            return End("done", found)
        if found.kind == "running":
            attempt.mark_started()
        absent = absent + 1 if found.kind == "absent" else 0
        if absent >= 2:
            return End("vanished")


def _next_limit(attempt: Attempt, give_up_at: float) -> float:
    """When following must look up next at the latest: a stop's confirmation, the job's
    deadline, the bound on the wait for ComfyUI to start the prompt."""
    limit = give_up_at
    if not attempt.timed_out:
        limit = min(limit, attempt.deadline)  # infinite until the prompt starts
    if not attempt.started and attempt.stop is None:
        limit = min(limit, attempt.start_by)
    return limit


def _on_message(attempt: Attempt, message: WsMessage) -> Literal["ending", "ended"] | None:
    """Publish what a message means; say whether the prompt is ending or has ended."""
    events = attempt.events
    match message:
        case ExecutionStart():
            attempt.mark_started()
        case ExecutionCached(data=data):
            if data.nodes:
                events.soon(NodeCachedData(node_ids=list(data.nodes)))
        case Executing(data=data):
            if data.node is None:
                return "ended"  # `executing` with node null: the prompt is done
            attempt.mark_started()
            attempt.seen.current_node = data.node
            events.soon(NodeStartedData(node_id=data.node, class_type=attempt.class_of(data.node)))
        case Progress(data=data):
            node = data.node or attempt.seen.current_node
            if node is not None:
                events.soon(
                    NodeProgressData(node_id=node, value=int(data.value), max=int(data.max))
                )
        case Executed(data=data):
            attempt.seen.outputs.add(data.node)
            attempt.outputs.early(data.node, data.output or {})
            events.soon(NodeOutputData(node_id=data.node, output=data.output or {}))
        case ExecutionSuccess() | ExecutionError() | ExecutionInterrupted():
            return "ending"
    return None


async def _next(watch: Watch, wait: float) -> Item | None:
    try:
        async with asyncio.timeout(wait):
            return await watch.get()
    except TimeoutError:
        return None
