"""What the ComfyUI-compatible endpoints do: take prompts, show queue and history, cancel.

Each prompt becomes one of our jobs, with the prompt id as job id. Callers are told apart by
their API key (all callers are one when the gateway has no keys); each sees and touches only
its own prompts.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.api.errors import ApiError
from gateway.api.native.fleetinfo import FleetInfo
from gateway.api.native.history import HistoryReader
from gateway.api.native.prompts import Entry, PromptIndex
from gateway.api.native.sockets import SocketHub
from gateway.api.native.uploads import UPLOADS, uploads_in
from gateway.balancer.expiry import EndedRecords
from gateway.balancer.fleet import FleetView
from gateway.balancer.requestchecks import check_job_id
from gateway.bus.contract import (
    ContractError,
    JobAccepted,
    JobInput,
    JobRecord,
    JobRequest,
    JobStatus,
    NativePrompt,
    Subjects,
    encode,
)
from gateway.comfyui.graph import is_link
from gateway.comfyui.validation import Validator
from gateway.settings import Settings
from gateway.storage import Storage

log = logging.getLogger(__name__)

SECRET_EXTRA_DATA = frozenset({"auth_token_comfy_org", "api_key_comfy_org"})
# Room left in a NATS message for the KV headers around a stored prompt.
PAYLOAD_HEADROOM = 4096
Reply = tuple[int, dict[str, Any]]


def comfy_error(kind: str, message: str, details: str = "") -> dict[str, Any]:
    """A ComfyUI error body: `error` with type/message/details/extra_info, no node errors."""
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    return {"error": error, "node_errors": {}}


class Gateway(Protocol):
    """What the ComfyUI-compatible API needs of its gateway (`gateway.api.services.Services`)."""

    nc: Client
    js: JetStreamContext
    jobs_kv: KeyValue
    fleet: FleetView
    settings: Settings
    subjects: Subjects
    storage: Storage | None

    async def submit(self, request: JobRequest) -> JobAccepted: ...

    async def cancel(self, job_id: str) -> JobRecord: ...

    async def wait_logged(self, record: JobRecord) -> bool: ...

    async def record_from_log(self, job_id: str) -> JobRecord: ...


class NativeService:
    """The state behind the ComfyUI-compatible API in one gateway."""

    def __init__(self, services: Gateway, prompts_kv: KeyValue) -> None:
        self._services = services
        self.settings = services.settings
        self._kv = prompts_kv
        retention = services.settings.job_records_retention_s
        # Ended prompts leave KV with their jobs' records, by the same mechanism.
        ended = (
            EndedRecords(services.js, services.subjects.prompts_bucket, retention)
            if retention > 0
            else None
        )
        self.index = PromptIndex(
            prompts_kv, services.jobs_kv, self._expired_record, ended, retention
        )
        self.reader = HistoryReader(services.js, services.subjects)
        self.hub = SocketHub(
            services.nc, services.subjects, self.index, self.reader, services.storage
        )
        self.fleet = FleetInfo(services.fleet.table)

    async def logged(self, entries: list[Entry]) -> None:
        """Wait (briefly) until the logs of these ended prompts hold their ends, as a REST
        result does: a client that reads a prompt's log next finds it whole."""
        waiting = [e for e in entries if e.record is not None and not e.logged]

        async def one(entry: Entry) -> None:
            assert entry.record is not None
            await self._services.wait_logged(entry.record)
            # Once per prompt, whatever the answer: with no log sink, or one far behind, a
            # client polling /history would otherwise wait again, entry by entry, every poll.
            entry.logged = True

        await asyncio.gather(*(one(entry) for entry in waiting))

    # -- POST /prompt ------------------------------------------------------------------------

    async def enqueue(self, caller: str, body: Any) -> Reply:
        """Take a prompt: ComfyUI's answer and status code."""
        if not isinstance(body, dict) or "prompt" not in body:
            return 400, comfy_error("no_prompt", "No prompt provided", "No prompt provided")
        prompt = body["prompt"]
        extra_data = body.get("extra_data", {})
        partial = body.get("partial_execution_targets")
        client_id = body.get("client_id")
        number = body.get("number")
        if not isinstance(prompt, dict):
            return 400, comfy_error("invalid_prompt", "Invalid prompt", "prompt is not an object")
        if not isinstance(extra_data, dict):
            return 400, comfy_error(
                "invalid_prompt", "Invalid prompt", "extra_data is not an object"
            )
        if partial is not None and not isinstance(partial, list):
            return 400, comfy_error(
                "invalid_prompt", "Invalid prompt", "partial_execution_targets is not a list"
            )
        if client_id is not None and not isinstance(client_id, str):
            client_id = str(client_id)
        if isinstance(number, bool) or not isinstance(number, int | float):
            number = None
        # Tokens for paid API nodes: ComfyUI keeps them out of history, and so do we (they are
        # not passed to the servers either: a job's request lands in the logs).
        extra_data = {k: v for k, v in extra_data.items() if k not in SECRET_EXTRA_DATA}

        services = self._services
        inputs = []
        if services.storage is not None:
            inputs = await uploads_in(services.storage, caller, prompt)
        registry = await self.fleet.registry()
        outputs: list[str] = []
        node_errors: dict[str, Any] = {}
        # With no live server known, nothing can be judged: the job waits for one, as REST jobs do.
        if registry.object_info:
            uploaded = {item.name for item in inputs}
            on_servers = registry.input_files()
            validation = Validator(registry, _exists(uploaded, on_servers)).validate(
                copy.deepcopy(prompt), partial
            )
            if not validation.ok:
                return 400, {"error": validation.error, "node_errors": validation.node_errors}
            outputs, node_errors = validation.outputs, validation.node_errors

        native = NativePrompt(
            prompt_id="",
            caller=caller,
            prompt=prompt,
            extra_data=extra_data,
            outputs_to_execute=outputs,
            client_id=client_id,
            number=number,
            front=body.get("front") is True,
            created_ms=int(time.time() * 1000),
        )
        if len(encode(native)) > services.nc.max_payload - PAYLOAD_HEADROOM:
            return 413, comfy_error(
                "prompt_too_large",
                "Prompt too large",
                f"the prompt with its extra_data exceeds {services.nc.max_payload} bytes",
            )
        wanted = body.get("prompt_id")
        for _ in range(2):
            entry = await self._record(caller, native, wanted)
            try:
                await self._submit(entry, prompt, outputs, inputs, client_id)
            except ApiError as exc:
                self.index.remove(entry.prompt_id)
                await self._kv.delete(entry.prompt_id)
                if exc.code == "duplicate_job" and wanted is not None:
                    wanted = None  # a job of that id exists (its prompt was deleted): a new id
                    continue
                answer = comfy_error(exc.code, exc.message, _said(exc.details))
                if exc.retry_after is not None:  # sent as Retry-After too (routes.py)
                    answer["error"]["extra_info"]["retry_after_s"] = exc.retry_after
                return exc.status, answer
            break
        self.hub.queue_changed(caller)
        return 200, {
            "prompt_id": entry.prompt_id,
            "number": entry.number,
            "node_errors": node_errors,
        }

    async def _submit(
        self,
        entry: Entry,
        prompt: dict[str, Any],
        outputs: list[str],
        inputs: list[JobInput],
        client_id: str | None,
    ) -> None:
        services = self._services
        request = JobRequest(
            workflow=_needed(prompt, outputs) if outputs else prompt,
            inputs=inputs,
            priority=1 if entry.prompt.front else 0,
            job_id=entry.prompt_id,
            max_attempts=services.settings.default_max_attempts,
            metadata={"api": "comfyui", **({"client_id": client_id} if client_id else {})},
            caller=entry.prompt.caller,
        )
        accepted = await services.submit(request)
        if accepted.replayed:
            # A prompt sent again runs again, as on ComfyUI; its old job is not it.
            raise ApiError(409, "duplicate_job", f"job id {request.job_id!r} is already in use")

    async def _record(self, caller: str, prompt: NativePrompt, wanted: object) -> Entry:
        """Store the prompt under the client's id if it is new and usable, else under a new one."""
        candidate = wanted if isinstance(wanted, str) and _usable(wanted) else None
        while True:
            prompt_id = candidate or str(uuid.uuid4())
            prompt.prompt_id = prompt_id
            try:
                revision = await self._kv.create(prompt_id, encode(prompt))
            except KeyWrongLastSequenceError:
                candidate = None  # used before: this prompt gets an id of its own
                continue
            return self.index.add(prompt, revision)

    # -- queue, interrupt, history -----------------------------------------------------------

    def owned(self, caller: str, prompt_id: object) -> Entry | None:
        entry = self.index.get(prompt_id) if isinstance(prompt_id, str) else None
        return entry if entry is not None and entry.prompt.caller == caller else None

    async def delete_pending(self, caller: str, prompt_ids: Iterable[object] | None) -> None:
        """POST /queue delete (ids) or clear (None): the caller's pending prompts only."""
        _, pending = self.index.queue_of(caller)
        wanted = None if prompt_ids is None else {p for p in prompt_ids if isinstance(p, str)}
        targets = [e for e in pending if wanted is None or e.prompt_id in wanted]
        cancelled = await asyncio.gather(*(self._cancel(entry) for entry in targets))
        for entry, gone in zip(targets, cancelled, strict=True):
            if gone:
                # Deleted from the queue means never in history, as on one server, even when
                # another server had already started it. One that ended first stays.
                self.index.remove(entry.prompt_id)
                await self._kv.delete(entry.prompt_id)
        if targets:
            self.hub.queue_changed(caller)

    async def interrupt(self, caller: str, prompt_id: object) -> None:
        """POST /interrupt: the caller's running prompt (the named one, if it is running)."""
        if prompt_id is None:
            running, _ = self.index.queue_of(caller)
            if running is not None:
                await self._cancel(running)
            return
        entry = self.owned(caller, prompt_id)
        if entry is not None and entry.executing:
            await self._cancel(entry)

    async def _cancel(self, entry: Entry) -> bool:
        """Cancel the prompt's job; whether it ended cancelled (not finished first)."""
        try:
            record = await self._services.cancel(entry.prompt_id)
        except ApiError as exc:
            # Ended meanwhile: nothing left to cancel, as on a single server.
            log.info("not cancelling %s: %s", entry.prompt_id, exc.message)
            return False
        return record.status == JobStatus.CANCELLED

    def history(self, caller: str) -> list[Entry]:
        """The caller's history: ended prompts that ran (a deleted pending one never did)."""
        return [e for e in self.index.history_of(caller) if _ran(e)]

    async def delete_history(self, caller: str, prompt_ids: Iterable[object] | None) -> None:
        wanted = None if prompt_ids is None else {p for p in prompt_ids if isinstance(p, str)}
        for entry in self.index.history_of(caller):
            if wanted is None or entry.prompt_id in wanted:
                self.index.remove(entry.prompt_id)
                await self._kv.delete(entry.prompt_id)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _expired_record(self, job_id: str) -> JobRecord | None:
        """The record of a prompt's job that has left KV, from its log; None if it has none."""
        try:
            return await self._services.record_from_log(job_id)
        except ApiError:
            return None

    async def close(self) -> None:
        await self.hub.close()
        await self.reader.close()


def _said(details: Any) -> str:
    """A refusal's details as ComfyUI's `details` text: the problems it lists, one a line."""
    problems = details.get("problems") if isinstance(details, dict) else None
    if isinstance(problems, list):
        return "\n".join(str(problem) for problem in problems)
    if details is None:
        return ""
    # A string as in ComfyUI's answers, but one a client can parse back.
    return details if isinstance(details, str) else msgspec.json.encode(details).decode()


def _usable(prompt_id: str) -> bool:
    if prompt_id == UPLOADS:  # /view tells outputs from uploads by that first segment
        return False
    try:
        check_job_id(prompt_id)
    except ContractError:
        return False
    return True


def _ran(entry: Entry) -> bool:
    record = entry.record
    if record is None:
        return False
    return record.status != JobStatus.CANCELLED or record.started_at is not None


def _exists(uploaded: set[str], on_servers: set[str]) -> Callable[[str], bool]:
    def exists(value: str) -> bool:
        bare = value.removesuffix(" [input]")
        return value in uploaded or bare in on_servers

    return exists


def _needed(prompt: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """The part of the graph the outputs depend on (what ComfyUI would execute)."""
    keep: set[str] = set()
    todo = [o for o in outputs if o in prompt]
    while todo:
        node_id = todo.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        node = prompt.get(node_id)
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        values = inputs.values() if isinstance(inputs, dict) else ()
        todo.extend(str(v[0]) for v in values if is_link(v) and str(v[0]) in prompt)
    return {node_id: node for node_id, node in prompt.items() if node_id in keep}
