"""Prompt history (`/history`) and the job views built from it and the queue (`/api/jobs`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

MAX_HISTORY = 10_000
_MEDIA_KEYS = ("images", "video", "audio", "gifs", "3d")


@dataclass
class QueueItem:
    """One accepted prompt, shaped like the real queue's tuple."""

    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    sensitive: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    """Arrival order, to break ties where the real server compares whole tuples."""

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def heap_key(self) -> tuple[int | float, str, int]:
        return (self.number, self.prompt_id, self.seq)


class History:
    """Finished prompts, oldest first, capped like the real server's."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._seq: dict[str, int] = {}

    def add(self, item: QueueItem, result: dict[str, Any], status: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"prompt": item.as_list(), "outputs": {}, "status": status}
        entry.update(result)
        # Assigning keeps a reused prompt_id at its first position, as a dict does upstream.
        self._entries[item.prompt_id] = entry
        self._seq[item.prompt_id] = item.seq
        if len(self._entries) > MAX_HISTORY:
            oldest = next(iter(self._entries))
            del self._entries[oldest]
            self._seq.pop(oldest, None)

    def get(self, prompt_id: str) -> dict[str, Any]:
        if prompt_id in self._entries:
            return {prompt_id: copy.deepcopy(self._entries[prompt_id])}
        return {}

    def page(self, max_items: int | None, offset: int) -> dict[str, Any]:
        """GET /history: `max_items` newest when no offset, else from position `offset`."""
        if offset < 0 and max_items is not None:
            offset = len(self._entries) - max_items
        out: dict[str, Any] = {}
        for index, key in enumerate(self._entries):
            if index >= offset:
                out[key] = self._entries[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def delete(self, prompt_id: str) -> None:
        self._entries.pop(prompt_id, None)
        self._seq.pop(prompt_id, None)

    def clear(self) -> None:
        self._entries.clear()
        self._seq.clear()

    def items(self) -> list[tuple[str, dict[str, Any], int]]:
        return [(k, v, self._seq.get(k, 0)) for k, v in self._entries.items()]


def _outputs_summary(outputs: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    count = 0
    preview: dict[str, Any] | None = None
    for node_id, node_output in outputs.items():
        for media in _MEDIA_KEYS:
            items = node_output.get(media) if isinstance(node_output, dict) else None
            if not isinstance(items, list):
                continue
            count += len(items)
            if preview is None and items and isinstance(items[0], dict):
                preview = {**items[0], "nodeId": node_id, "mediaType": media}
    return count, preview


def job_from_queue(item: QueueItem, running: bool, detail: bool) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": item.prompt_id,
        "status": "in_progress" if running else "pending",
        "priority": item.number,
        "create_time": item.extra_data.get("create_time"),
        "outputs_count": 0,
    }
    if detail:
        job["outputs"] = {}
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
    return job


def job_from_history(prompt_id: str, entry: dict[str, Any], detail: bool) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry["status"]
    messages = status.get("messages", [])
    events = {event: data for event, data in messages}
    if "execution_interrupted" in events:
        state = "cancelled"
    elif "execution_error" in events or status.get("status_str") == "error":
        state = "failed"
    else:
        state = "completed"
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": state,
        "priority": number,
        "create_time": extra_data.get("create_time"),
    }
    if "execution_start" in events:
        job["execution_start_time"] = events["execution_start"].get("timestamp")
    if messages:
        job["execution_end_time"] = messages[-1][1].get("timestamp")
    if "execution_error" in events:
        job["execution_error"] = events["execution_error"]
    count, preview = _outputs_summary(entry.get("outputs", {}))
    job["outputs_count"] = count
    if preview is not None:
        job["preview_output"] = preview
    if detail:
        job["outputs"] = entry.get("outputs", {})
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def list_jobs(
    running: list[QueueItem],
    pending: list[QueueItem],
    history: History,
    query: dict[str, str],
) -> dict[str, Any]:
    """GET /api/jobs: filter by status, sort (newest first by default), paginate."""
    rows: list[tuple[Any, int, dict[str, Any]]] = [
        (item.extra_data.get("create_time", 0), item.seq, job_from_queue(item, run, False))
        for items, run in ((running, True), (pending, False))
        for item in items
    ]
    for prompt_id, entry, seq in history.items():
        job = job_from_history(prompt_id, entry, False)
        rows.append((job.get("create_time") or 0, seq, job))
    wanted = {s for s in query.get("status", "").split(",") if s}
    if wanted:
        rows = [row for row in rows if row[2]["status"] in wanted]
    sort_by = query.get("sort_by", "created_at")
    descending = query.get("sort_order", "desc") != "asc"
    if sort_by == "execution_duration":
        rows.sort(
            key=lambda r: (
                r[2].get("execution_end_time", 0) - r[2].get("execution_start_time", 0),
                r[1],
            ),
            reverse=descending,
        )
    else:
        rows.sort(key=lambda r: (r[0], r[1]), reverse=descending)
    total = len(rows)
    offset = max(0, int(query.get("offset", "0") or 0))
    limit_text = query.get("limit")
    limit = int(limit_text) if limit_text else None
    window = rows[offset:] if limit is None else rows[offset : offset + limit]
    return {
        "jobs": [row[2] for row in window],
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(window) < total,
        },
    }
