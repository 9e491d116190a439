"""Recovery: index what the JSONL files hold and the index lacks, or rebuild it from scratch.

The JSONL files are the record; the index is derived from them. The index remembers, per job,
how many bytes of its file it has taken in (`jobs.log_bytes`), so a start-up check reads only
the files whose size differs: those a crash left ahead of the index, and all of them when the
index is new.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb
import msgspec

from gateway.bus.contract import ContractError, WebhookAttempt
from gateway.logsink import paths
from gateway.logsink.attempts import index_attempt_lines, parse_attempt
from gateway.logsink.config import SinkConfig
from gateway.logsink.index import open_database
from gateway.logsink.jsonl import read_lines
from gateway.logsink.records import EventRecord, parse_event
from gateway.logsink.store import LogStore

log = logging.getLogger(__name__)

_BATCH_EVENTS = 5000
_BATCH_BYTES = 16 * 1024 * 1024


class RecoveryStats(msgspec.Struct, kw_only=True):
    files_seen: int = 0
    files_read: int = 0
    events_indexed: int = 0
    lines_rejected: int = 0


def reconcile(store: LogStore) -> RecoveryStats:
    """Index every line of the JSONL files that the index does not hold yet."""
    stats = RecoveryStats()
    indexed = store.index.indexed_files()
    pending: list[tuple[str, EventRecord]] = []
    attempts: list[tuple[str, WebhookAttempt, int]] = []
    pending_bytes = 0
    # Sorted by name, that is by submission time: a rebuild reads jobs in the order they came.
    for entry in sorted(os.scandir(store.files.folder), key=lambda e: e.name):
        if not entry.name.endswith(paths.SUFFIX) or not entry.is_file():
            continue
        stats.files_seen += 1
        rel = paths.relpath_of(entry.name)
        done = indexed.get(rel, 0)
        size = entry.stat().st_size
        if size == done:
            continue
        reread = size < done
        if reread:
            log.warning("%s is shorter than its indexed part; indexing it again", entry.path)
            done = 0
        stats.files_read += 1
        lines, new_size = read_lines(Path(entry.path), done)
        if new_size == 0 and rel not in indexed:
            # Only an unfinished line was there: the job's first event will come again.
            Path(entry.path).unlink()
            continue
        records: list[tuple[str, EventRecord]] = []
        for line, end in lines:
            try:
                records.append((rel, parse_event(line, end)))
            except ContractError as exc:
                try:
                    # A webhook attempt's line; its job's events come before it in the file.
                    attempts.append((rel, parse_attempt(line), end))
                except ContractError:
                    stats.lines_rejected += 1
                    log.error("%s: a line at byte %d is not an event: %s", entry.path, end, exc)
        if reread:
            # Its events are in the index already, as far as it went: looked up by id.
            stats.events_indexed += store.index_lines(pending)
            stats.events_indexed += store.index_lines(records, check_ids=True)
            index_attempt_lines(store, attempts)
            pending, attempts, pending_bytes = [], [], 0
            continue
        for item in records:
            pending.append(item)
            pending_bytes += len(item[1].line)
            if len(pending) >= _BATCH_EVENTS or pending_bytes >= _BATCH_BYTES:
                stats.events_indexed += store.index_lines(pending)
                pending, pending_bytes = [], 0
        if not pending:
            index_attempt_lines(store, attempts)  # their jobs' events are indexed
            attempts = []
    stats.events_indexed += store.index_lines(pending)
    index_attempt_lines(store, attempts)
    if stats.files_read:
        log.info(
            "indexed %d events from %d of %d log files",
            stats.events_indexed,
            stats.files_read,
            stats.files_seen,
        )
    return stats


def rebuild_index(
    data_dir: str | os.PathLike[str], config: SinkConfig | None = None
) -> RecoveryStats:
    """Build `logs/index.duckdb` anew from the JSONL files and put it in place of the old one.

    The log sink must be stopped (IndexLockedError otherwise). The new index is built beside
    the old one and swapped in at the end, so a failure leaves the old index as it was.
    """
    data = Path(data_dir)
    target = paths.index_path(data)
    config = config or SinkConfig()
    if target.exists():
        _check_not_in_use(target, config)
    scratch = target.with_name(target.name + ".rebuild")
    for stale in (scratch, _wal(scratch)):
        stale.unlink(missing_ok=True)
    store = LogStore(data, config, index_file=scratch)
    try:
        stats = reconcile(store)
    finally:
        store.close()
    # A write-ahead log left by the old index would be replayed into the new one.
    _wal(target).unlink(missing_ok=True)
    scratch.replace(target)
    log.info("rebuilt %s: %d events from %d files", target, stats.events_indexed, stats.files_read)
    return stats


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _check_not_in_use(target: Path, config: SinkConfig) -> None:
    try:
        open_database(target, memory_limit=config.memory_limit, threads=config.threads).close()
    except duckdb.Error as exc:
        # A damaged index is a reason to rebuild, not a reason to refuse (IndexLockedError is).
        log.warning("the old index cannot be opened (%s); replacing it", exc)
