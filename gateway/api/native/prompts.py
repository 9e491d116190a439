"""What each caller of the ComfyUI-compatible API has submitted, and where each prompt is.

Every gateway keeps this view in memory: prompts come from KV `comfy_prompts` (whichever gateway
took them), their states from the job records in KV `comfy_jobs`. The queue and history a caller
sees are computed from it, as one ComfyUI server would show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gateway.contract import ContractError, JobRecord, JobStatus, NativePrompt, decode

log = logging.getLogger(__name__)

# ComfyUI keeps at most this many history entries; each caller gets as many here.
MAX_HISTORY = 10_000


@dataclass
class Entry:
    """One prompt and the latest record of its job (None until the first one is seen)."""

    prompt: NativePrompt
    revision: int
    record: JobRecord | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the job has ended and what its history entry needs is known."""
    interrupted: dict[str, Any] | None = None
    """For a run that was cancelled: ComfyUI's `execution_interrupted` data."""
    run_started: float | None = None
    """When the socket hub relayed this run's start: the record says so a moment later."""

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
    def executing(self) -> bool:
        """Started on a server (ComfyUI's "running"), not merely bound to one."""
        if self.status == JobStatus.RUNNING:
            return True
        return self.run_started is not None and not self.finished


class PromptIndex:
    """The native prompts of every caller, kept current from the two KV buckets."""

    def __init__(
        self,
        prompts_kv: KeyValue,
        jobs_kv: KeyValue,
        replay: Callable[[str], Coroutine[Any, Any, dict[str, Any] | None]],
    ) -> None:
        self._prompts_kv = prompts_kv
        self._jobs_kv = jobs_kv
        self._replay = replay
        self._entries: dict[str, Entry] = {}
        self._finished_order: dict[str, list[str]] = {}
        self._listeners: list[Callable[[Entry], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

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
        return entry

    def remove(self, prompt_id: str) -> None:
        entry = self._entries.pop(prompt_id, None)
        if entry is not None:
            order = self._finished_order.get(entry.prompt.caller, [])
            with contextlib.suppress(ValueError):
                order.remove(prompt_id)

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
        order = self._finished_order.setdefault(entry.prompt.caller, [])
        order.append(entry.prompt_id)
        record = entry.record
        if record is not None and record.status == JobStatus.CANCELLED and record.started_at:
            self._spawn(self._settle_interrupted(entry))
        else:
            entry.settled.set()
        for listener in self._listeners:
            listener(entry)
        if len(order) > MAX_HISTORY:
            oldest = order[0]
            self._spawn(self._forget(oldest))

    async def _settle_interrupted(self, entry: Entry) -> None:
        # Which node was cut short is told only by the job's events: read them back once.
        try:
            entry.interrupted = await self._replay(entry.prompt_id)
        except Exception:
            log.exception("reading back the events of %s failed", entry.prompt_id)
        finally:
            entry.settled.set()

    async def _forget(self, prompt_id: str) -> None:
        try:
            await self._prompts_kv.delete(prompt_id)
        except Exception:
            log.exception("dropping the old history entry %s failed", prompt_id)
        self.remove(prompt_id)

    async def run(self) -> None:
        """Follow KV `comfy_prompts` until cancelled: prompts other gateways take, deletions."""
        watcher = await self._prompts_kv.watchall()
        try:
            async for kv_entry in watcher:
                if kv_entry is None:
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
                self._spawn(self._load_record(prompt.prompt_id))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
            for task in list(self._tasks):
                task.cancel()

    async def _load_record(self, prompt_id: str) -> None:
        try:
            found = await self._jobs_kv.get(prompt_id)
        except KeyNotFoundError:
            return  # not written yet: the live updates will bring it
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
        """The caller's prompts that have not ended, in the order they would run."""
        return sorted(
            (e for e in self._entries.values() if e.prompt.caller == caller and not e.finished),
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

    def remaining(self, caller: str, *, besides: str | None = None) -> int:
        """ComfyUI's `queue_remaining` for the caller: its running plus pending prompts."""
        return sum(1 for e in self.open_of(caller) if e.prompt_id != besides)

    def history_of(self, caller: str) -> list[Entry]:
        """The caller's ended prompts, oldest end first."""
        ids = self._finished_order.get(caller, [])
        return [
            self._entries[i]
            for i in ids
            if i in self._entries and self._entries[i].settled.is_set()
        ]


def _started(entry: Entry) -> float:
    record = entry.record
    if record is not None and record.started_at is not None:
        return record.started_at
    return entry.run_started if entry.run_started is not None else float("inf")
