"""The log store: a batch of events into the JSONL files and the index, each event once.

The order of work inside one batch is what makes the guarantee:

1. begin a DuckDB transaction and insert the events, skipping ids already indexed; RETURNING
   names the new ones (duplicates from redelivery or a restart stop here);
2. append the new events' lines to their job files, fdatasync'ed;
3. merge the jobs' rows, record how many bytes of each file are indexed, commit;
4. only then does the consumer acknowledge the batch.

A failure in 2 or 3 rolls back the transaction and cuts the files back, so the retry starts
clean. A crash between 2 and 3 leaves lines in a file past its indexed size: on start,
`rebuild.reconcile` indexes those lines first, so when the unacknowledged events are delivered
again step 1 finds them and no line is written twice.

Every method runs on the sink's single writer thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from gateway.bus.contract import ContractError
from gateway.logsink import paths
from gateway.logsink.config import SinkConfig
from gateway.logsink.index import IndexDB
from gateway.logsink.jsonl import JsonlError, JsonlFiles, Undo
from gateway.logsink.records import EventRecord, JobDelta, parse_event

log = logging.getLogger(__name__)

_REMEMBERED_JOBS = 100_000


class BatchStats(msgspec.Struct, kw_only=True):
    received: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0


class LogStore:
    """JSONL files and DuckDB index of one data folder."""

    def __init__(
        self, data_dir: Path, config: SinkConfig | None = None, *, index_file: Path | None = None
    ) -> None:
        config = config or SinkConfig()
        self.data_dir = data_dir
        self.index = IndexDB(
            index_file or paths.index_path(data_dir),
            memory_limit=config.memory_limit,
            threads=config.threads,
        )
        self.files = JsonlFiles(data_dir, open_files=config.open_files)
        # job id -> its log file; bounded, the index answers for jobs it forgot.
        self._paths: OrderedDict[str, str] = OrderedDict()

    def close(self) -> None:
        self.files.close()
        self.index.close()

    # ---------------------------------------------------------------------------------------

    def write_batch(self, raws: Sequence[bytes]) -> BatchStats:
        """Store a batch of events as received from the bus (see the module docstring)."""
        stats = BatchStats(received=len(raws))
        records = _unique(self._parse(raws, stats))
        if not records:
            return stats
        undo: list[Undo] = []
        # Paths from every record, not only the new ones: a job the index lacks has no event
        # there (events and its row are committed together), so the answer is the same, and
        # knowing the files now lets them be opened while the index inserts.
        job_paths = self._resolve_paths(records)
        opening = self.files.open_ahead(job_paths.values())
        groups: dict[str, list[bytes]] = {}
        self.index.begin()
        try:
            try:
                new_ids = self.index.insert_events([record.line for record in records])
            finally:
                opening.result()
            fresh = [record for record in records if record.head.event_id in new_ids]
            for record in fresh:
                groups.setdefault(job_paths[record.head.job_id], []).append(record.line)
            self.files.drop_opened(keep=groups)
            sizes, undo = self.files.append(groups)
            self.index.upsert_jobs(_deltas(fresh, job_paths, sizes))
            self.index.commit()
        except BaseException:
            self.files.drop_opened()
            self._roll_back(undo)
            raise
        self._remember({job_id: job_paths[job_id] for job_id in {r.head.job_id for r in fresh}})
        stats.written = len(fresh)
        stats.duplicates = len(raws) - stats.rejected - len(fresh)
        return stats

    def index_lines(self, items: Sequence[tuple[str, EventRecord]]) -> int:
        """Index events already in their JSONL files (path, record); return how many were new.

        Used by recovery: lines past a file's indexed size, or every line after a lost index.
        """
        if not items:
            return 0
        self.index.begin()
        try:
            unique = _unique(record for _, record in items)
            new_ids = self.index.insert_events([record.line for record in unique])
            deltas: dict[tuple[str, str], JobDelta] = {}
            fresh = 0
            for rel, record in items:
                head = record.head
                delta = deltas.get((head.job_id, rel))
                if delta is None:
                    delta = deltas[(head.job_id, rel)] = JobDelta(
                        job_id=head.job_id, log_file_path=rel
                    )
                delta.log_bytes = max(delta.log_bytes, record.end_offset)
                if head.event_id in new_ids:
                    new_ids.discard(head.event_id)
                    delta.fold(head)
                    fresh += 1
            self.index.upsert_jobs(list(deltas.values()))
            self.index.commit()
        except BaseException:
            self._roll_back([])
            raise
        self._remember({job_id: rel for job_id, rel in deltas})
        return fresh

    # ---------------------------------------------------------------------------------------

    def _parse(self, raws: Iterable[bytes], stats: BatchStats) -> list[EventRecord]:
        records: list[EventRecord] = []
        for raw in raws:
            try:
                records.append(parse_event(raw))
            except ContractError as exc:
                stats.rejected += 1
                log.error("dropping a message that is not an event (%s): %.300r", exc, raw)
        return records

    def _resolve_paths(self, fresh: Sequence[EventRecord]) -> dict[str, str]:
        """The log file of each job in the batch.

        A job keeps the file it was first given (remembered here, else found in the index).
        A new job's file is named after its `queued` event; if that has not been seen (lost,
        or delivered after other events), after the earliest event of the job in the batch,
        and the job keeps that name when its `queued` event turns up later.
        """
        job_paths: dict[str, str] = {}
        unknown: dict[str, None] = {}  # a dict, not a list: ordered, and `in` is O(1)
        for record in fresh:
            job_id = record.head.job_id
            if job_id in job_paths or job_id in unknown:
                continue
            rel = self._paths.get(job_id)
            if rel is None:
                unknown[job_id] = None
            else:
                job_paths[job_id] = rel
        if not unknown:
            return job_paths
        job_paths.update(self.index.job_paths(list(unknown)))
        stamps: dict[str, float] = {}
        queued: set[str] = set()
        for record in fresh:
            head = record.head
            if head.job_id in job_paths or head.job_id in queued:
                continue
            if head.type == "queued":
                stamps[head.job_id] = head.ts
                queued.add(head.job_id)
            elif head.job_id not in stamps or head.ts < stamps[head.job_id]:
                stamps[head.job_id] = head.ts
        for job_id, ts in stamps.items():
            if job_id not in queued:
                log.warning(
                    "job %s: first event seen is not `queued`; naming its log after %s",
                    job_id,
                    ts,
                )
            job_paths[job_id] = paths.log_file_relpath(job_id, ts)
        return job_paths

    def _remember(self, job_paths: dict[str, str]) -> None:
        for job_id, rel in job_paths.items():
            self._paths[job_id] = rel
            self._paths.move_to_end(job_id)
        while len(self._paths) > _REMEMBERED_JOBS:
            self._paths.popitem(last=False)

    def _roll_back(self, undo: list[Undo]) -> None:
        try:
            self.index.rollback()
        except Exception:
            # DuckDB may have aborted the transaction itself; the files still need cutting back.
            log.exception("rolling back the index transaction failed")
        try:
            self.files.undo(undo)
        except JsonlError:
            log.critical("job logs may hold lines the index lacks; restart the sink to reconcile")
            raise


def _unique(records: Iterable[EventRecord]) -> list[EventRecord]:
    seen: set[str] = set()
    unique: list[EventRecord] = []
    for record in records:
        if record.head.event_id not in seen:
            seen.add(record.head.event_id)
            unique.append(record)
    return unique


def _deltas(
    fresh: list[EventRecord], job_paths: dict[str, str], sizes: dict[str, int]
) -> list[JobDelta]:
    deltas: dict[str, JobDelta] = {}
    for record in fresh:
        head = record.head
        delta = deltas.get(head.job_id)
        if delta is None:
            rel = job_paths[head.job_id]
            delta = deltas[head.job_id] = JobDelta(
                job_id=head.job_id, log_file_path=rel, log_bytes=sizes[rel]
            )
        delta.fold(head)
    return list(deltas.values())
