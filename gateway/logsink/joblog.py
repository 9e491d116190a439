"""Reading one job's log for `<prefix>.logs.job`: the JSONL file, as far as it is indexed.

The file is the exact record of the events as they crossed the bus, so entries come from it, not
from the index; the index says where the file is and how much of it is complete (a batch being
appended past that point is not acknowledged yet and may still be taken back).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import msgspec

from gateway.logsink.messages import JobLogPage
from gateway.logsink.sandbox import QueryRefused


def read_job_page(
    cursor: duckdb.DuckDBPyConnection,
    data_dir: Path,
    job_id: str,
    *,
    offset: int,
    max_bytes: int,
    head_only: bool = False,
) -> JobLogPage:
    """The job's events from byte `offset` of its file, as many as fit in `max_bytes` of JSON."""
    row = cursor.execute(
        "SELECT log_file_path, log_bytes, last_seq FROM jobs WHERE job_id = $1", [job_id]
    ).fetchone()
    if row is None or row[0] is None:
        raise QueryRefused("not_found", f"no log for job {job_id!r}")
    rel, size, last_seq = str(row[0]), int(row[1]), int(row[2])

    def page(entries: list[msgspec.Raw], next_offset: int, complete: bool) -> JobLogPage:
        return JobLogPage(
            job_id=job_id,
            log_file_path=rel,
            entries=entries,
            next_offset=next_offset,
            complete=complete,
            last_seq=last_seq,
        )

    if head_only:
        return page([], size, True)
    if offset < 0 or offset > size:
        raise QueryRefused("invalid_request", f"offset {offset} is outside the log ({size} bytes)")
    try:
        with (data_dir / rel).open("rb") as fh:
            fh.seek(offset)
            data = fh.read(size - offset)
    except OSError as exc:
        raise QueryRefused("log_unreadable", f"the log file {rel} cannot be read: {exc}") from exc
    entries: list[msgspec.Raw] = []
    position = offset
    for line in data.split(b"\n")[:-1]:
        if entries and (position - offset) + len(line) + 1 > max_bytes:
            return page(entries, position, False)
        if len(line) + 1 > max_bytes:
            raise QueryRefused(
                "too_large", f"an event of job {job_id!r} is larger than a reply can carry"
            )
        position += len(line) + 1
        if line.strip():
            entries.append(msgspec.Raw(line))
    return page(entries, position, True)
