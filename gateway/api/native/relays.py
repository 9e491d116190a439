"""The relay state of each prompt in flight, kept from its run's start to its end.

A socket that joins with the client id of a running prompt gets `executing` {node} and then the
rest of the prompt's messages, as on ComfyUI; `progress_state` carries every node started so
far. Both need the prompt's state since its start, so it outlives the caller's sockets, and a
prompt this gateway did not follow from its start (taken by another gateway, started while no
socket listened, or dropped to keep the state bounded) is caught up from its stored events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Final

from nats.aio.msg import Msg

from gateway.api.native.early import EarlyEvents
from gateway.api.native.history import READ_ERRORS, HistoryReader
from gateway.api.native.messages import PromptRelay
from gateway.bus.contract import Event, Running

log = logging.getLogger(__name__)

# Binary frames of a run not known yet, held for its `running` event (a frame travels apart
# from the events, and may overtake it): this many at most, for a few seconds.
MAX_HELD_FRAMES: Final = 64


class RelayBook:
    """Each prompt's `PromptRelay`, and which ComfyUI prompt (run) is which of ours."""

    def __init__(
        self,
        history: HistoryReader,
        relay_events: Callable[[str, list[Event]], None],
        relay_frame: Callable[[Msg], None],
    ) -> None:
        self._history = history
        self._relay_events = relay_events
        self._relay_frame = relay_frame
        self._relays: dict[str, PromptRelay] = {}  # oldest first
        self._runs: dict[str, str] = {}
        self._frames = EarlyEvents(max_held=MAX_HELD_FRAMES)
        # Per prompt being caught up: its live events meanwhile, and who waits for it.
        self._held: dict[str, list[Event]] = {}
        self._joined: dict[str, list[Callable[[PromptRelay], None]]] = {}
        self._catching: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._relays)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._relays

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._relays))

    def get(self, job_id: str) -> PromptRelay | None:
        return self._relays.get(job_id)

    def open(self, job_id: str) -> PromptRelay:
        relay = self._relays.get(job_id)
        if relay is None:
            relay = self._relays[job_id] = PromptRelay(job_id)
        return relay

    def note_run(self, run_id: str, job_id: str) -> None:
        """ComfyUI's `run_id` is our `job_id`: relay the run's frames that came before."""
        self._runs[run_id] = job_id
        for msg in self._frames.take(run_id):
            self._relay_frame(msg)

    def job_of_run(self, run_id: str, frame: Msg) -> str | None:
        """The prompt of a binary frame's run; None if unknown (the frame is held a moment)."""
        job_id = self._runs.get(run_id)
        if job_id is None:
            self._frames.hold(run_id, frame)
        return job_id

    def forget(self, job_id: str) -> None:
        self._relays.pop(job_id, None)
        self._runs = {run: job for run, job in self._runs.items() if job != job_id}

    def hold(self, job_id: str, event: Event) -> bool:
        """Keep a live event of a prompt being caught up; whether it was kept."""
        held = self._held.get(job_id)
        if held is not None:
            held.append(event)
        return held is not None

    async def catch_up(self, job_id: str, joined: Callable[[PromptRelay], None]) -> None:
        """Rebuild the prompt's relay from its stored events.

        `joined(relay)` is called once it is rebuilt, before the live events that came
        meanwhile are relayed: what a joining socket is told comes before them.
        """
        task = self._catching.get(job_id)
        if task is None:
            self._held[job_id] = []
            self._joined[job_id] = []
            task = self._catching[job_id] = asyncio.create_task(self._rebuild(job_id))
        self._joined[job_id].append(joined)
        await asyncio.shield(task)  # a socket that goes away leaves it to the others

    def close(self) -> None:
        self._frames.clear()
        for task in list(self._catching.values()):
            task.cancel()

    async def _rebuild(self, job_id: str) -> None:
        try:
            stored = await self._history.events(job_id)
        except READ_ERRORS as exc:
            log.warning("cannot catch up with prompt %s: %s", job_id, exc)
            stored = []
        finally:
            del self._catching[job_id]
            held = self._held.pop(job_id)
            joined = self._joined.pop(job_id)
        relay = PromptRelay(job_id)
        for event in stored:
            relay.translate(event)  # what was said then is gone; only the state is wanted
            if isinstance(event, Running):
                self.note_run(event.data.prompt_id, job_id)
        if relay.started or job_id not in self._relays:
            self._relays[job_id] = relay
        for then in joined:
            then(self._relays[job_id])
        self._relay_events(job_id, held)
