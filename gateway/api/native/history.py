"""History entries: an ended prompt as ComfyUI stores it, its messages read back from its events.

ComfyUI's entry keeps the run's `execution_*` messages as the socket sent them: which nodes the
cache served, which ran before an error or an interruption. Only the job's events tell that, so
each entry's events are read back from the stream once, when the entry is first asked for, and
told again by the same `PromptRelay` the sockets use. Reading lazily keeps a gateway that starts
with thousands of ended prompts from replaying them all; an entry whose events cannot be read
is told from its job record instead, without those node lists.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.api.native.messages import (
    error_data,
    history_messages,
    ms,
    queue_item,
    stored_file,
)
from gateway.api.native.prompts import Entry
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    ContractError,
    Event,
    JobStatus,
    Subjects,
    decode_event,
)

log = logging.getLogger(__name__)

READ_S: Final = 10.0
# Event streams read back at once (a first GET /history of many entries).
_READS_AT_ONCE: Final = 16
_ENDS: Final = frozenset({"execution_success", "execution_error", "execution_interrupted"})
# What reading a job's events back may raise.
READ_ERRORS = (TimeoutError, NatsError, ContractError)


class HistoryReader:
    """Builds history entries, reading each ended prompt's events back once."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subjects = subjects
        self._reads = asyncio.Semaphore(_READS_AT_ONCE)
        self._reading: dict[str, asyncio.Task[list[list[Any]] | None]] = {}

    async def entry(self, entry: Entry) -> dict[str, Any]:
        """The `/history` entry of an ended prompt."""
        return history_entry(entry, await self.messages(entry))

    async def entries(self, entries: list[Entry]) -> dict[str, dict[str, Any]]:
        """`{prompt_id: entry}` in the order given."""
        bodies = await asyncio.gather(*(self.entry(entry) for entry in entries))
        return {entry.prompt_id: body for entry, body in zip(entries, bodies, strict=True)}

    async def messages(self, entry: Entry) -> list[list[Any]]:
        """The entry's `status.messages`."""
        if entry.told is None:
            reading = self._reading.get(entry.prompt_id)
            if reading is None:
                reading = asyncio.create_task(self._read(entry.prompt_id))
                self._reading[entry.prompt_id] = reading
                reading.add_done_callback(lambda _: self._reading.pop(entry.prompt_id, None))
            # Shielded: a reader that gives up leaves the result for the next one.
            told = await asyncio.shield(reading)
            if told is not None:
                entry.told = told
        return _told_or_recorded(entry)

    async def close(self) -> None:
        for task in list(self._reading.values()):
            task.cancel()

    async def _read(self, job_id: str) -> list[list[Any]] | None:
        """The messages the job's events tell; [] if it has none, None if unreadable now."""
        try:
            events = await self.events(job_id)
        except READ_ERRORS as exc:
            log.warning("cannot read back the events of %s now: %s", job_id, exc)
            return None
        if events and not any(isinstance(event, TERMINAL_EVENTS) for event in events):
            return None  # the end is not in the stream yet: read again next time
        return history_messages(job_id, events)

    async def events(self, job_id: str) -> list[Event]:
        """The job's events stored so far ([] if none are kept); raises one of `READ_ERRORS`."""
        async with self._reads:
            return await self._events(job_id)

    async def _events(self, job_id: str) -> list[Event]:
        stream, subject = self._subjects.events_stream, self._subjects.events(job_id)
        try:
            last = await self._js.get_last_msg(stream, subject)
        except NotFoundError:
            return []  # aged out of the stream: the record tells what it can
        assert last.seq is not None
        sub = await self._js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        events: list[Event] = []
        try:
            async with asyncio.timeout(READ_S):
                while True:
                    msg = await sub.next_msg(timeout=READ_S)
                    events.append(decode_event(msg.data))
                    # Read up to the last event there was when the read began.
                    if msg.metadata.sequence.stream >= last.seq:
                        return events
        finally:
            await sub.unsubscribe()


def _told_or_recorded(entry: Entry) -> list[list[Any]]:
    told = entry.told
    if told and told[0][0] == "execution_start" and told[-1][0] in _ENDS:
        return told
    return recorded_messages(entry)


def recorded_messages(entry: Entry) -> list[list[Any]]:
    """`status.messages` from the job record alone: no cached or executed nodes known."""
    prompt_id = entry.prompt_id
    record = entry.record
    assert record is not None
    messages: list[list[Any]] = []
    started = record.started_at if record.started_at is not None else record.finished_at
    if record.started_at is not None or record.status != JobStatus.CANCELLED:
        stamp = ms(started)
        messages.append(["execution_start", {"prompt_id": prompt_id, "timestamp": stamp}])
        cached = {"nodes": [], "prompt_id": prompt_id, "timestamp": stamp}
        messages.append(["execution_cached", cached])
    end = ms(record.finished_at)
    if record.status == JobStatus.SUCCEEDED:
        messages.append(["execution_success", {"prompt_id": prompt_id, "timestamp": end}])
    elif record.status == JobStatus.FAILED and record.error is not None:
        error = error_data(prompt_id, record.error, record.finished_at or 0.0)
        messages.append(["execution_error", error])
    elif record.status == JobStatus.CANCELLED:
        interrupted = {
            "prompt_id": prompt_id,
            "node_id": "",
            "node_type": "",
            "executed": [],
            "timestamp": end,
        }
        messages.append(["execution_interrupted", interrupted])
    return messages


def history_entry(entry: Entry, messages: list[list[Any]]) -> dict[str, Any]:
    """The `/history` entry of an ended prompt, shaped as ComfyUI stores it."""
    record = entry.record
    assert record is not None
    outputs: dict[str, dict[str, list[dict[str, str]]]] = {}
    succeeded = record.status == JobStatus.SUCCEEDED
    if succeeded:
        for output in record.outputs:
            if output.source == "websocket":
                continue  # ComfyUI keeps no file of them, and lists none in history
            files = outputs.setdefault(output.node_id, {}).setdefault(output.kind, [])
            files.append(stored_file(entry.prompt_id, output))
    return {
        "prompt": queue_item(entry),
        "outputs": outputs,
        "status": {
            "status_str": "success" if succeeded else "error",
            "completed": succeeded,
            "messages": messages,
        },
        "meta": {
            node_id: {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            for node_id in outputs
        },
    }
