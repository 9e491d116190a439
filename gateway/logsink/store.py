"""The log store: a batch of events into the JSONL files and the index, each event once.

Duplicates are told by position in the EVENTS stream, not by a key on `events.event_id` (whose
index DuckDB keeps in memory, growing with every event). The index records how far into the
stream it holds every event (`upto`), in the same transaction as the rows, and the sink reads
the stream in order from just after it (sink.py); so a redelivery at or below `upto` is one
already stored. Beyond it, each job's events come in the order of their `seq` (its writers
append them so), so an event that may be in the index already is one whose `seq` is not beyond
the newest its job has there: a crash left it in the files (indexed again at start by
`rebuild.reconcile`), the position was lost, or it was published again. Only those are looked
up by id.

The order of work inside one batch is what makes the guarantee:

1. leave out the events at or below `upto`, and those looked up and found;
2. begin a DuckDB transaction and insert the new events;
3. append their lines to their job files, fdatasync'ed;
4. merge the jobs' rows, record how many bytes of each file are indexed and the batch's
   stream position, commit;
5. only then does the consumer acknowledge the batch.

A failure in 3 or 4 rolls back the transaction and cuts the files back, so the retry starts
clean. A crash between 3 and 4 leaves lines in a file past its indexed size: on start,
`rebuild.reconcile` indexes those lines first, so when their events are delivered again step 1
finds them and no line is written twice.

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

# Jobs are short-lived: ten thousand covers every job in progress on a big fleet, and an entry
# (~350 bytes) per job more would grow the sink by 35 MB before levelling off.
_REMEMBERED_JOBS = 10_000


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
        # job id -> its log file and newest seq; bounded, the index answers for jobs it forgot.
        self._paths: OrderedDict[str, tuple[str, int]] = OrderedDict()
        # Every event at or below this stream sequence is stored (see the module docstring).
        self.upto = 0

    def close(self) -> None:
        self.files.close()
        self.index.close()

    # ---------------------------------------------------------------------------------------

    def write_batch(self, raws: Sequence[bytes], seqs: Sequence[int] | None = None) -> BatchStats:
        """Store a batch of events as received from the bus (see the module docstring).

        `seqs`: each event's sequence in the EVENTS stream, in stream order apart from
        redeliveries. Without them every event is looked up by id (tools and tests).
        """
        stats = BatchStats(received=len(raws))
        if seqs is None:
            pairs: list[tuple[bytes, int | None]] = [(raw, None) for raw in raws]
        else:
            pairs = [(raw, seq) for raw, seq in zip(raws, seqs, strict=True) if seq > self.upto]
        parsed = self._parse(pairs, stats)
        records = _unique(record for record, _ in parsed)
        # Paths from every record, not only the new ones: a job the index lacks has no event
        # there (events and its row are committed together), so the answer is the same, and
        # knowing the files now lets them be opened while the index inserts.
        job_paths, last_seqs = self._resolve_paths(records)
        records = self._leave_out_stored(parsed, records, last_seqs)
        if not records:
            stats.duplicates = len(raws) - stats.rejected
            return stats
        position = max(seqs) if seqs else 0
        undo: list[Undo] = []
        opening = self.files.open_ahead(job_paths.values())
        groups: dict[str, list[bytes]] = {}
        fresh = records
        self.index.begin()
        try:
            try:
                self.index.insert_events([record.line for record in fresh])
            finally:
                opening.result()
            for record in fresh:
                groups.setdefault(job_paths[record.head.job_id], []).append(record.line)
            self.files.drop_opened(keep=groups)
            sizes, undo = self.files.append(groups)
            self.index.upsert_jobs(_deltas(fresh, job_paths, sizes))
            if position:
                self.index.advance_position(position)
            self.index.commit()
        except BaseException:
            self.files.drop_opened()
            self._roll_back(undo)
            raise
        self.upto = max(self.upto, position)
        self._remember(job_paths, fresh)
        stats.written = len(fresh)
        stats.duplicates = len(raws) - stats.rejected - len(fresh)
        return stats

    def index_lines(
        self, items: Sequence[tuple[str, EventRecord]], *, check_ids: bool = False
    ) -> int:
        """Index events already in their JSONL files (path, record); return how many were new.

        Used by recovery: lines past a file's indexed size, or every line after a lost index;
        `check_ids` for lines the index may hold already (a file read again from its start).
        """
        if not items:
            return 0
        unique = _unique(record for _, record in items)
        new_ids = {record.head.event_id for record in unique}
        if check_ids:
            new_ids -= self.index.known_event_ids(list(new_ids))
        self.index.begin()
        try:
            self.index.insert_events(
                [record.line for record in unique if record.head.event_id in new_ids]
            )
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
        self._remember({job_id: rel for job_id, rel in deltas}, [record for _, record in items])
        return fresh

    def prune(self, cutoff: float, limit: int) -> int:
        """Delete the logs (index rows, then files) of up to `limit` jobs whose last event is
        older than `cutoff` (epoch seconds); return how many.

        Rows go first: a crash before the files are gone leaves files the index lacks, which
        the next start indexes again and a later pass deletes again; never rows without files.
        """
        jobs = self.index.jobs_before(cutoff, limit)
        if not jobs:
            return 0
        self.index.begin()
        try:
            self.index.delete_jobs([job_id for job_id, _ in jobs])
            self.index.commit()
        except BaseException:
            self._roll_back([])
            raise
        for job_id, _ in jobs:
            self._paths.pop(job_id, None)
        self.files.delete([rel for _, rel in jobs if rel is not None])
        return len(jobs)

    # ---------------------------------------------------------------------------------------

    def _leave_out_stored(
        self,
        parsed: list[tuple[EventRecord, int | None]],
        records: list[EventRecord],
        last_seqs: dict[str, int],
    ) -> list[EventRecord]:
        """`records` less the events the index holds already.

        Each job's events come in the order of their seq, so only one whose seq is not beyond
        the newest its job has may be in the index (see the module docstring); only those are
        looked up, and every event when stream positions are not given.
        """
        doubtful: list[str] = []
        latest = dict(last_seqs)
        for record, seq in parsed:
            head = record.head
            if seq is None or head.seq <= latest.get(head.job_id, 0):
                doubtful.append(head.event_id)
            latest[head.job_id] = max(latest.get(head.job_id, 0), head.seq)
        if not doubtful:
            return records
        known = self.index.known_event_ids(doubtful)
        if not known:
            return records
        log.info("%d events delivered again were stored before; left out", len(known))
        return [record for record in records if record.head.event_id not in known]

    def _parse(
        self, pairs: Iterable[tuple[bytes, int | None]], stats: BatchStats
    ) -> list[tuple[EventRecord, int | None]]:
        records: list[tuple[EventRecord, int | None]] = []
        for raw, seq in pairs:
            try:
                records.append((parse_event(raw), seq))
            except ContractError as exc:
                stats.rejected += 1
                log.error("dropping a message that is not an event (%s): %.300r", exc, raw)
        return records

    def _resolve_paths(self, fresh: Sequence[EventRecord]) -> tuple[dict[str, str], dict[str, int]]:
        """The log file of each job in the batch, and the newest seq the index has of it.

        A job keeps the file it was first given (remembered here, else found in the index).
        A new job's file is named after its `queued` event; if that has not been seen (lost,
        or delivered after other events), after the earliest event of the job in the batch,
        and the job keeps that name when its `queued` event turns up later.
        """
        job_paths: dict[str, str] = {}
        last_seqs: dict[str, int] = {}
        unknown: dict[str, None] = {}  # a dict, not a list: ordered, and `in` is O(1)
        for record in fresh:
            job_id = record.head.job_id
            if job_id in job_paths or job_id in unknown:
                continue
            place = self._paths.get(job_id)
            if place is None:
                unknown[job_id] = None
            else:
                job_paths[job_id], last_seqs[job_id] = place
        if not unknown:
            return job_paths, last_seqs
        for job_id, (rel, last_seq) in self.index.job_places(list(unknown)).items():
            job_paths[job_id], last_seqs[job_id] = rel, last_seq
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
        return job_paths, last_seqs

    def _remember(self, job_paths: dict[str, str], stored: Iterable[EventRecord]) -> None:
        """Remember the file and newest seq of each job that `stored` holds events of."""
        newest: dict[str, int] = {}
        for record in stored:
            head = record.head
            newest[head.job_id] = max(newest.get(head.job_id, 0), head.seq)
        for job_id, seq in newest.items():
            place = self._paths.get(job_id)
            self._paths[job_id] = (job_paths[job_id], max(seq, place[1] if place else 0))
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
