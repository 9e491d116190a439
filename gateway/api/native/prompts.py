"""What each caller of the ComfyUI-compatible API has submitted, and where each prompt is.

Every gateway keeps this view in memory: prompts come from KV `comfy_prompts` (whichever gateway
took them), their states from the job records in KV `comfy_jobs`. The queue and history a caller
sees are computed from it, as one ComfyUI server would show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gateway.balancer.expiry import WRONG_REVISION, EndedRecords
from gateway.bus.contract import (
    ContractError,
    JobRecord,
    JobStatus,
    NativePrompt,
    decode,
    encode,
    now,
)

log = logging.getLogger(__name__)

# ComfyUI keeps at most this many history entries; each caller gets as many here.
MAX_HISTORY = 10_000
# Open prompts' records are read again this often: an end missed while the connection to NATS
# was down must still show (and close the client's prompt).
RESYNC_S = 15.0
# Record reads at once, when a gateway starts with many prompts in the bucket.
_READS_AT_ONCE = 16


@dataclass
class Entry:
    """One prompt and the latest record of its job (None until the first one is seen)."""

    prompt: NativePrompt
    revision: int
    record: JobRecord | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the job has ended: its history entry can be told from then on."""
    told: list[list[Any]] | None = None
    """The history entry's `status.messages`, once read back from the job's events."""
    run_started: float | None = None
    """When the socket hub relayed this run's start: the record says so a moment later."""
    logged: bool = False
    """Whether the job's log has been waited for, to hold its end (NativeService.logged)."""

    @property
    def prompt_id(self) -> str:
        return self.prompt.prompt_id

    @property
    def number(self) -> float | int:
        """ComfyUI's `number`: the client's, else the bucket revision (negative for `front`)."""
        if self.prompt.number is not None:
            return self.prompt.number
        return -self.revision if self.prompt.front else self.revision

    @property
    def status(self) -> JobStatus:
        return self.record.status if self.record is not None else JobStatus.QUEUED

    @property
    def finished(self) -> bool:
        return self.status.terminal

    @property
    def open(self) -> bool:
        """Still in the queue: ComfyUI drops a prompt from it only once history has it."""
        return not self.settled.is_set()

    @property
    def executing(self) -> bool:
        """Started on a server (ComfyUI's "running"), not merely bound to one, and open."""
        return self.open and (self.status == JobStatus.RUNNING or self.run_started is not None)


class PromptIndex:
    """The native prompts of every caller, kept current from the two KV buckets."""

    def __init__(
        self,
        prompts_kv: KeyValue,
        jobs_kv: KeyValue,
        expired: Callable[[str], Awaitable[JobRecord | None]] | None = None,
        ended: EndedRecords | None = None,
        retention_s: float = 0.0,
    ) -> None:
        self._prompts_kv = prompts_kv
        self._jobs_kv = jobs_kv
        # The record of a job that KV no longer holds (ended long ago), from its log.
        self._expired = expired
        # Ended prompts leave the bucket, and this view, `retention_s` after their jobs' ends,
        # with the jobs' records (0: kept, as the records are).
        self._ended = ended
        self._retention_s = retention_s
        self._entries: dict[str, Entry] = {}
        # Per caller, its ended prompts (a dict for its order and O(1) removal).
        self._finished_by: dict[str, dict[str, None]] = {}
        self._on_add: list[Callable[[Entry], None]] = []
        self._listeners: list[Callable[[Entry], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reads = asyncio.Semaphore(_READS_AT_ONCE)
        self.ready = asyncio.Event()
        """Set once the prompts in the bucket and their records have been read."""

    def on_add(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` for each prompt taken in."""
        self._on_add.append(listener)

    def on_finish(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` once for each prompt that reaches an end."""
        self._listeners.append(listener)

    # -- feeding ---------------------------------------------------------------------------

    def knows(self, prompt_id: str) -> bool:
        return prompt_id in self._entries

    def get(self, prompt_id: str) -> Entry | None:
        return self._entries.get(prompt_id)

    def add(self, prompt: NativePrompt, revision: int) -> Entry:
        """Take a prompt in (idempotent: a known prompt keeps its state)."""
        entry = self._entries.get(prompt.prompt_id)
        if entry is None:
            entry = Entry(prompt=prompt, revision=revision)
            self._entries[prompt.prompt_id] = entry
            for listener in self._on_add:
                listener(entry)
        return entry

    def remove(self, prompt_id: str) -> None:
        entry = self._entries.pop(prompt_id, None)
        if entry is not None:
            self._finished_by.get(entry.prompt.caller, {}).pop(prompt_id, None)

    def on_record(self, record: JobRecord) -> None:
        """A job record changed; `record.job_id` may or may not be a native prompt."""
        entry = self._entries.get(record.job_id)
        if entry is None or entry.finished:
            return
        if entry.record is not None and entry.record.last_seq > record.last_seq:
            return  # an older write arriving late
        entry.record = record
        if record.status.terminal:
            self._finished(entry)

    def _finished(self, entry: Entry) -> None:
        ended = self._finished_by.setdefault(entry.prompt.caller, {})
        ended[entry.prompt_id] = None
        entry.settled.set()
        for listener in self._listeners:
            listener(entry)
        if self._ended is not None and entry.prompt.ended_at is None:
            self._spawn(self._expire(entry))
        if len(ended) > MAX_HISTORY:
            oldest = min(ended, key=lambda i: _ended_at(self._entries.get(i)))
            ended.pop(oldest)
            self._spawn(self._forget(oldest))

    async def _expire(self, entry: Entry) -> None:
        """Write the ended prompt's entry again, to leave the bucket with its job's record.

        Every gateway sees the end and tries; the write is made over the revision each knows,
        so the first one takes and the others (and a write racing a deletion) are refused.
        """
        assert self._ended is not None
        ending = msgspec.structs.replace(entry.prompt, number=entry.number, ended_at=now())
        try:
            await self._ended.put(entry.prompt_id, encode(ending), revision=entry.revision)
        except APIError as exc:
            if exc.err_code != WRONG_REVISION:
                log.warning("prompt %s: its entry is not set to expire: %s", entry.prompt_id, exc)
                return
            log.debug(
                "prompt %s: its entry changed meanwhile (set to expire by another, or deleted)",
                entry.prompt_id,
            )
        except Exception:
            # Transient (a reconnect, a time-out): the next gateway to start sets it.
            log.warning("prompt %s: its entry is not set to expire", entry.prompt_id, exc_info=True)
            return
        entry.prompt = ending

    def forget_ended_before(self, cutoff: float) -> list[str]:
        """Drop from this view the prompts whose jobs ended before `cutoff` (epoch seconds):
        their entries have left the bucket by their TTL, which no watcher is told of."""
        gone = [e.prompt_id for e in self._entries.values() if e.finished and _ended_at(e) < cutoff]
        for prompt_id in gone:
            self.remove(prompt_id)
        return gone

    async def _forget(self, prompt_id: str) -> None:
        try:
            await self._prompts_kv.delete(prompt_id)
        except Exception:
            log.exception("dropping the old history entry %s failed", prompt_id)
        self.remove(prompt_id)

    async def run(self) -> None:
        """Follow KV `comfy_prompts` until cancelled: prompts other gateways take, deletions."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow())
            tasks.create_task(self._resync())

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S)
            for entry in [e for e in self._entries.values() if not e.finished]:
                await self._load_record(entry.prompt_id)
            if self._retention_s > 0:
                self.forget_ended_before(now() - self._retention_s)

    async def _follow(self) -> None:
        watcher = await self._prompts_kv.watchall()
        loading: list[asyncio.Task[None]] = []
        try:
            async for kv_entry in watcher:
                if kv_entry is None:
                    if loading:
                        await asyncio.gather(*loading)
                    loading.clear()
                    self.ready.set()
                    continue
                if kv_entry.operation in (KV_DEL, KV_PURGE):
                    self.remove(kv_entry.key)
                    continue
                if kv_entry.key in self._entries or not kv_entry.value:
                    continue
                try:
                    prompt = decode(kv_entry.value, NativePrompt)
                except ContractError:
                    log.exception("skipping the unreadable prompt entry %s", kv_entry.key)
                    continue
                self.add(prompt, kv_entry.revision or 0)
                read = asyncio.create_task(self._load_record(prompt.prompt_id))
                if self.ready.is_set():
                    self._tasks.add(read)
                    read.add_done_callback(self._tasks.discard)
                else:
                    loading.append(read)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
            for task in list(self._tasks):
                task.cancel()

    async def _load_record(self, prompt_id: str) -> None:
        try:
            async with self._reads:
                found = await self._jobs_kv.get(prompt_id)
        except KeyNotFoundError:
            # Not written yet (the live updates will bring it), or expired: then its log tells.
            expired = await self._expired(prompt_id) if self._expired is not None else None
            if expired is not None:
                self.on_record(expired)
            return
        except Exception:
            # Transient (a reconnect, a time-out): the next resync reads it again.
            log.warning("cannot read the record of prompt %s now", prompt_id, exc_info=True)
            return
        if found.value:
            self.on_record(decode(found.value, JobRecord))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, prompt_id: str, within: float) -> Entry | None:
        """The entry once its job has ended (or as it is after `within` seconds)."""
        entry = self._entries.get(prompt_id)
        if entry is None or entry.settled.is_set():
            return entry
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await entry.settled.wait()
        return entry

    # -- views -------------------------------------------------------------------------------

    def open_of(self, caller: str) -> list[Entry]:
        """The caller's prompts not yet in history, in the order they would run."""
        return sorted(
            (e for e in self._entries.values() if e.prompt.caller == caller and e.open),
            key=lambda e: (e.number, e.revision),
        )

    def queue_of(self, caller: str) -> tuple[Entry | None, list[Entry]]:
        """(running, pending) as one server would show them: at most one running."""
        open_entries = self.open_of(caller)
        executing = [e for e in open_entries if e.executing]
        if not executing:
            return None, open_entries
        running = min(executing, key=lambda e: (_started(e), e.number))
        return running, [e for e in open_entries if e is not running]

    def running_of(self, caller: str) -> list[Entry]:
        """The caller's prompts started on a server and still open, first started first."""
        executing = [e for e in self.open_of(caller) if e.executing]
        return sorted(executing, key=lambda e: (_started(e), e.number))

    def remaining(self, caller: str) -> int:
        """ComfyUI's `queue_remaining` for the caller: its running plus pending prompts."""
        return len(self.open_of(caller))

    def history_of(self, caller: str) -> list[Entry]:
        """The caller's ended prompts, oldest end first (the same order on every gateway)."""
        entries = (self._entries.get(i) for i in self._finished_by.get(caller, {}))
        settled = [e for e in entries if e is not None and e.settled.is_set()]
        return sorted(settled, key=_ended_at)


def _ended_at(entry: Entry | None) -> float:
    record = entry.record if entry is not None else None
    return (record.finished_at or record.updated_at) if record is not None else 0.0


def _started(entry: Entry) -> float:
    record = entry.record
    if record is not None and record.started_at is not None:
        return record.started_at
    return entry.run_started if entry.run_started is not None else float("inf")
