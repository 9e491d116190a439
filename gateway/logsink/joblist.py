"""The job list for `<prefix>.logs.jobs`: the newest jobs of the index, filtered, as rows."""

from __future__ import annotations

from typing import Final

import duckdb

from gateway.bus.contract import LogQueryResult
from gateway.logsink.messages import JobListRequest
from gateway.logsink.refusal import QueryRefused
from gateway.logsink.sandbox import Stopper, run_read

MAX_JOBS: Final = 1000

# The filters are parameters: a NULL one matches every row.
_RECENT: Final = """
    SELECT job_id, status, server_id, attempts, submitted_at, started_at, finished_at,
           duration_s, queue_wait_s, error_type, error_message, output_count, log_file_path,
           pinned_server
    FROM jobs
    WHERE ($1::VARCHAR IS NULL OR status = $1)
      AND ($2::VARCHAR IS NULL OR server_id = $2)
      AND ($3::VARCHAR IS NULL OR caller = $3)
    ORDER BY submitted_at DESC
    LIMIT $4
"""


def recent_jobs(
    cursor: duckdb.DuckDBPyConnection,
    request: JobListRequest,
    *,
    timeout_s: float,
    stopper: Stopper,
) -> LogQueryResult:
    """The newest `request.limit` jobs (at most MAX_JOBS) matching its filters."""
    if request.limit < 1:
        raise QueryRefused("invalid_request", "limit must be 1 or more")
    limit = min(request.limit, MAX_JOBS)
    params = [request.status, request.server_id, request.caller, limit]
    return run_read(cursor, _RECENT, params, max_rows=limit, timeout_s=timeout_s, stopper=stopper)
