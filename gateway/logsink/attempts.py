"""Webhook attempts into the job's JSONL log and the index's `webhook_deliveries`, once each.

An attempt is a line of its own kind in the job's file (`"type": "webhook_attempt"`), after the
events it came after; the same order of work as for events (store.py) keeps a crash from
losing or doubling one: rows inserted (RETURNING the new ones), their lines appended and
synced, the file's indexed size moved on, commit, and only then the acknowledgement.

An attempt can arrive before its job's first events are indexed (they travel on another
stream): it is held back until they are, and after HOLD_UNKNOWN_S it is indexed without a line
(a job whose events never came, or whose log was removed).

Every function runs on the sink's single writer thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

import msgspec

from gateway.bus.contract import ContractError, WebhookAttempt, decode
from gateway.logsink import schema
from gateway.logsink.jsonl import Undo
from gateway.logsink.store import LogStore

log = logging.getLogger(__name__)

HOLD_UNKNOWN_S: Final = 300.0
_encoder: Final = msgspec.json.Encoder()


def parse_attempt(raw: bytes) -> WebhookAttempt:
    """An attempt as published or as a line of a job's log; ContractError if it is not one."""
    return decode(raw, WebhookAttempt)


def write_attempts(store: LogStore, raws: Sequence[bytes]) -> set[int]:
    """Store the attempts of a batch; return the positions of those held back for now."""
    parsed: list[tuple[int, WebhookAttempt]] = []
    for position, raw in enumerate(raws):
        try:
            parsed.append((position, parse_attempt(raw)))
        except ContractError as exc:
            log.error("dropping a message that is not a webhook attempt (%s): %.300r", exc, raw)
    places = store.index.job_places(sorted({attempt.job_id for _, attempt in parsed}))
    paths = {job_id: path for job_id, (path, _) in places.items()}
    held: set[int] = set()
    ready: list[WebhookAttempt] = []
    for position, attempt in parsed:
        if attempt.job_id in paths or time.time() - attempt.ts > HOLD_UNKNOWN_S:
            ready.append(attempt)
        else:
            held.add(position)
    if ready:
        _store(store, ready, paths)
    return held


def _store(store: LogStore, attempts: list[WebhookAttempt], paths: dict[str, str]) -> None:
    undo: list[Undo] = []
    store.index.begin()
    try:
        new = _insert(store, attempts)
        groups: dict[str, list[bytes]] = {}
        for attempt in attempts:
            rel = paths.get(attempt.job_id)
            if attempt.attempt_id not in new:
                continue
            if rel is None:
                log.warning("job %s: webhook attempt indexed without a log file", attempt.job_id)
                continue
            groups.setdefault(rel, []).append(_encoder.encode(attempt))
        sizes, undo = store.files.append(groups) if groups else ({}, [])
        owners = {rel: job_id for job_id, rel in paths.items()}
        _indexed_upto(store, [(owners[rel], rel, size) for rel, size in sizes.items()])
        store.index.commit()
    except BaseException:
        try:
            store.index.rollback()
        finally:
            store.files.undo(undo)
        raise


def _insert(store: LogStore, attempts: list[WebhookAttempt]) -> set[str]:
    batch = _encoder.encode(attempts).decode()
    return {row[0] for row in store.index.execute(schema.INSERT_ATTEMPTS, [batch])}


def _indexed_upto(store: LogStore, files: list[tuple[str, str, int]]) -> None:
    """Move each job's indexed size of its file on to `size` (never back)."""
    for job_id, rel, size in files:
        store.index.execute(
            "UPDATE jobs SET log_bytes = greatest(log_bytes, $3) "
            "WHERE job_id = $1 AND log_file_path = $2",
            [job_id, rel, size],
        )


def index_attempt_lines(store: LogStore, items: Sequence[tuple[str, WebhookAttempt, int]]) -> int:
    """Index attempts already in their files (path, attempt, offset after its line); recovery.

    Returns how many were new to the index.
    """
    if not items:
        return 0
    store.index.begin()
    try:
        new = _insert(store, [attempt for _, attempt, _ in items])
        ends: dict[tuple[str, str], int] = {}
        for rel, attempt, end in items:
            key = (attempt.job_id, rel)
            ends[key] = max(ends.get(key, 0), end)
        _indexed_upto(store, [(job_id, rel, end) for (job_id, rel), end in ends.items()])
        store.index.commit()
    except BaseException:
        store.index.rollback()
        raise
    return len(new)
