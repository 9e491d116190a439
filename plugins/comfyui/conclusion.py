"""How an attempt ended, and saying so: the result from the end of following or the history,
the outputs stored or dropped, the history and the terminal event published.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError

from gateway.bus.contract import (
    CancelledData,
    FailedData,
    HistoryData,
    JobRecord,
    NodeOutputData,
    RetriedData,
    SucceededData,
    decode,
)
from gateway.bus.retry import through_election
from gateway.comfyui.outputs import WEBSOCKET_OUTPUT_CLASSES
from gateway.storage import StorageError
from plugins.comfyui import failures
from plugins.comfyui.attempt import Attempt, Outcome, Result
from plugins.comfyui.client import ComfyError, ComfyUnavailable, FileMissing
from plugins.comfyui.follow import End
from plugins.comfyui.messages import HistoryEntry

log = logging.getLogger(__name__)

# A history event must fit in one NATS message (1 MB by default) with room for the envelope.
_MAX_HISTORY_BYTES = 900_000


async def end_of(attempt: Attempt, end: End) -> Result:
    """The result of an attempt whose following ended as `end`."""
    stop = attempt.stop
    match end.kind:
        case "done":
            assert end.found is not None and end.found.raw is not None
            assert end.found.entry is not None
            return await from_history(attempt, end.found.raw, end.found.entry)
        case "unreachable":
            return attempt.retried(
                f"ComfyUI at {attempt.ctx.address} stopped answering during the job: {end.reason}"
            )
        case "vanished":
            return attempt.retried("ComfyUI lost the prompt (it restarted?)")
    # dequeued, or stopped and ComfyUI did not confirm within stop_wait_s.
    suffix = "" if end.kind == "dequeued" else " (ComfyUI did not confirm the interrupt)"
    if stop is not None and stop.kind == "cancel":
        return attempt.cancelled(stop.reason + suffix)
    if attempt.timed_out:
        return _timeout_result(attempt, None, suffix)
    assert stop is not None
    return attempt.retried(stop.reason + suffix, counts=stop.counts)


def _timeout_result(
    attempt: Attempt,
    history: dict[str, Any] | None,
    suffix: str = "",
    *,
    finished_anyway: bool = False,
) -> Result:
    how = (
        "ComfyUI finished it after that, and its outputs are not kept"
        if finished_anyway
        else f"ComfyUI was told to stop it{suffix}"
    )
    return Result(
        FailedData(
            code=failures.TIMEOUT,
            message=f"the job did not finish within {attempt.timeout:g} s of running; {how}",
            attempt=attempt.job.attempt,
            retryable=False,
        ),
        history,
    )


async def from_history(attempt: Attempt, raw: dict[str, Any], entry: HistoryEntry) -> Result:
    """The result that the prompt's history entry tells."""
    if entry.status is not None and entry.status.message("execution_start") is not None:
        attempt.mark_started()  # polled runs can start and end between two looks
    for node_id, output in entry.outputs.items():
        # Adopted, polled or cached runs: their outputs were not (all) seen on the socket.
        if node_id not in attempt.seen.outputs:
            attempt.seen.outputs.add(node_id)
            attempt.events.soon(NodeOutputData(node_id=node_id, output=output))
    status = entry.status
    error = status.message("execution_error") if status is not None else None
    interrupted = status.message("execution_interrupted") if status is not None else None
    succeeded = status is not None and status.status_str == "success" and error is None
    cancelling = attempt.stop is not None and attempt.stop.kind == "cancel"
    if attempt.timed_out and not cancelling:
        # The job's time was up before the prompt ended: it has failed, also when ComfyUI
        # finished it after all (an interrupt waits for the running node to end), and
        # nothing it saved is an output of the job.
        return _timeout_result(attempt, raw, finished_anyway=succeeded)
    if succeeded:
        return await _succeeded(attempt, raw, entry)
    if error is not None:
        if failures.is_out_of_memory(error):
            return await _out_of_memory(attempt, raw, error)
        data = failures.execution_failure(error, attempt.workflow, attempt.job.attempt)
        return Result(data, raw)
    if interrupted is not None:
        stop = attempt.stop
        if stop is not None and stop.kind == "cancel":
            return attempt.cancelled(stop.reason, raw)
        if stop is not None:
            return attempt.retried(stop.reason, raw, counts=stop.counts)
        node = interrupted.get("node_id")
        return attempt.failed(
            failures.INTERRUPTED,
            f"the prompt was interrupted on ComfyUI (at node {node}) by someone else",
            raw,
            retryable=True,
        )
    status_str = status.status_str if status is not None else "none"
    return attempt.failed(
        failures.COMFYUI_ERROR,
        f"ComfyUI ended the prompt with status {status_str!r} and gave no error",
        raw,
    )


def _unheard_images(attempt: Attempt) -> list[str]:
    """The nodes whose images came over a socket this attempt was not (always) hearing.

    ComfyUI keeps no copy of them: they went to a socket that is gone, or to whoever
    submitted an adopted prompt. Only a new run makes them again.
    """
    watch = attempt.watch
    if watch is not None and not watch.missed:
        return []
    return [
        node_id
        for node_id in attempt.workflow
        if attempt.class_of(node_id) in WEBSOCKET_OUTPUT_CLASSES
        and node_id not in attempt.node_errors
    ]


async def _succeeded(attempt: Attempt, raw: dict[str, Any], entry: HistoryEntry) -> Result:
    unheard = _unheard_images(attempt)
    if unheard:
        return attempt.retried(
            f"the images node(s) {', '.join(unheard)} sent over ComfyUI's websocket were not "
            "heard (the adapter's socket was lost, or the prompt was adopted)",
            raw,
        )
    # The history event goes out while the outputs are stored; the terminal event still
    # waits for both.
    history = asyncio.create_task(_emit_history(attempt, raw), name=f"history-{attempt.job.job_id}")
    try:
        outputs = await attempt.outputs.finish(entry.outputs)
    except FileMissing as exc:
        await history
        return attempt.failed(failures.OUTPUT_ERROR, str(exc), raw)
    except ComfyUnavailable as exc:
        await history
        return attempt.retried(f"ComfyUI stopped answering before its outputs were saved: {exc}")
    except StorageError as exc:
        await history
        return attempt.failed(
            failures.OUTPUT_ERROR,
            f"an output could not be stored: {exc}",
            raw,
            retryable=True,
            server_fault=True,
        )
    except BaseException:
        history.cancel()
        raise
    await history
    attempt.ctx.residency.observe_history(entry)
    data = SucceededData(
        attempt=attempt.job.attempt,
        outputs=outputs,
        node_errors=attempt.node_errors,
        duration_s=run_seconds(entry),
    )
    return Result(data, raw)


async def _emit_history(attempt: Attempt, raw: dict[str, Any]) -> None:
    attempt.history_sent = True
    await attempt.events.emit(HistoryData(prompt_id=attempt.prompt_id, history=_fit(raw)))


async def _out_of_memory(attempt: Attempt, raw: dict[str, Any], error: dict[str, Any]) -> Result:
    node = error.get("node_id")
    try:
        await attempt.ctx.client.free()
    except ComfyError as exc:
        log.warning("job %s: POST /free failed: %s", attempt.job.job_id, exc)
    return attempt.retried(
        f"ComfyUI ran out of memory in node {node} ({error.get('exception_type')}); "
        "models were unloaded",
        raw,
    )


async def conclude(attempt: Attempt, result: Result) -> None:
    """Publish the attempt's end, its history first; the caller acks the job then."""
    await attempt.clear_inputs()
    if not isinstance(result.data, SucceededData):
        await drop_outputs(attempt)
    if result.history is not None and not attempt.history_sent:
        await _emit_history(attempt, result.history)
    # A job cancelled meanwhile (by the gateway) refuses this: JobEnded, handled by the runner.
    await attempt.events.emit(result.data)


async def current_record(attempt: Attempt) -> JobRecord | None:
    """The job's record in KV now; None if there is none."""
    try:
        entry = await through_election(
            lambda: attempt.ctx.jobs_kv.get(attempt.job.job_id),
            f"reading job {attempt.job.job_id}",
        )
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return decode(entry.value, JobRecord)


async def drop_outputs(attempt: Attempt) -> None:
    """Delete what this attempt stored on the way, unless a later attempt has taken over.

    Every attempt stores under the same keys: an attempt handed back while its prompt
    ran on must not delete what the next attempt, elsewhere, stored there.
    """
    try:
        record = await current_record(attempt)
    except nats.errors.Error as exc:
        log.warning("job %s: no record to read (%s); keeping its files", attempt.job.job_id, exc)
        record = None
    if record is not None and record.attempt == attempt.job.attempt:
        await attempt.outputs.discard()
    else:
        await attempt.outputs.abandon()


def run_seconds(entry: HistoryEntry) -> float | None:
    """How long ComfyUI ran the prompt, from its history's timestamps; None if it does not say."""
    if entry.status is None:
        return None
    start = entry.status.message("execution_start")
    end = entry.status.message("execution_success")
    if start is None or end is None:
        return None
    begin, finish = start.get("timestamp"), end.get("timestamp")
    if isinstance(begin, int | float) and isinstance(finish, int | float):
        return max(0.0, (finish - begin) / 1000)
    return None


def _fit(history: dict[str, Any]) -> dict[str, Any]:
    """The history, small enough for one message: the workflow copy goes first if too big."""
    if len(msgspec.json.encode(history)) <= _MAX_HISTORY_BYTES:
        return history
    trimmed = dict(history)
    prompt = trimmed.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 2:
        trimmed["prompt"] = [*prompt[:2], {"omitted": "too large for an event"}, *prompt[3:]]
    if len(msgspec.json.encode(trimmed)) <= _MAX_HISTORY_BYTES:
        return trimmed
    return {
        "omitted": "the history is too large for an event",
        "outputs": trimmed.get("outputs", {}),
        "status": {"status_str": (trimmed.get("status") or {}).get("status_str")},
    }


def summary(data: Outcome) -> str:
    """One line on how an attempt ended, for the log."""
    match data:
        case SucceededData():
            return f"succeeded with {len(data.outputs)} output(s)"
        case FailedData():
            return f"failed ({data.code}): {data.message}"
        case CancelledData():
            return f"cancelled: {data.reason}"
        case RetriedData():
            return f"handed back (started={data.started}): {data.reason}"
