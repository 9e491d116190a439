"""The index's tables and ready-made views (see README.md for what each column means)."""

from __future__ import annotations

from typing import Final

# `events` has no key on purpose: a key is an index DuckDB keeps in memory, ~74 bytes an event,
# so it would outgrow any memory limit; duplicates are told by stream position instead (see
# `sink_position` and store.py).
EVENTS_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS {name} (
        event_id VARCHAR NOT NULL,
        job_id VARCHAR NOT NULL,
        seq BIGINT NOT NULL,
        ts TIMESTAMP NOT NULL,
        type VARCHAR NOT NULL,
        server_id VARCHAR,
        node_id VARCHAR,
        data JSON
    )
"""

TABLES: Final = (
    EVENTS_TABLE.format(name="events"),
    # How far into the EVENTS stream the index holds every event, committed in the same
    # transaction as the rows: one row, for the stream of that name made at that time (see
    # store.py).
    """
    CREATE TABLE IF NOT EXISTS sink_position (
        stream VARCHAR NOT NULL,
        stream_created VARCHAR NOT NULL,
        upto BIGINT NOT NULL
    )
    """,
    # duration_s and queue_wait_s are computed, so a merge of the other columns keeps them right.
    """
    CREATE TABLE IF NOT EXISTS jobs (
        job_id VARCHAR PRIMARY KEY,
        status VARCHAR,
        server_id VARCHAR,
        attempts INTEGER NOT NULL DEFAULT 0,
        submitted_at TIMESTAMP,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        duration_s DOUBLE GENERATED ALWAYS AS
            (date_diff('microsecond', started_at, finished_at) / 1e6) VIRTUAL,
        queue_wait_s DOUBLE GENERATED ALWAYS AS
            (date_diff('microsecond', submitted_at, started_at) / 1e6) VIRTUAL,
        error_type VARCHAR,
        error_message VARCHAR,
        workflow_hash VARCHAR,
        node_count INTEGER,
        output_count INTEGER,
        log_file_path VARCHAR,
        event_count BIGINT NOT NULL DEFAULT 0,
        last_seq BIGINT NOT NULL DEFAULT 0,
        last_event_at TIMESTAMP,
        -- bookkeeping: the seq the status comes from, and how much of the log file is indexed
        status_seq BIGINT NOT NULL DEFAULT 0,
        log_bytes BIGINT NOT NULL DEFAULT 0,
        -- who submitted the job (JobRequest.caller); last, where an older index gains it
        caller VARCHAR,
        -- the batch it was submitted in (JobRequest.batch_id), likewise
        batch_id VARCHAR,
        -- the server the job asked to run on (JobRequest.server), likewise
        pinned_server VARCHAR
    )
    """,
    # One row per attempt to deliver an event to a job's webhook (gateway/webhooks).
    """
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        attempt_id VARCHAR PRIMARY KEY,
        delivery_id VARCHAR NOT NULL,
        job_id VARCHAR NOT NULL,
        event_type VARCHAR NOT NULL,
        event_seq BIGINT NOT NULL,
        stream_seq BIGINT NOT NULL,
        attempt INTEGER NOT NULL,
        redelivery VARCHAR,
        url VARCHAR NOT NULL,
        outcome VARCHAR NOT NULL,
        status_code INTEGER,
        latency_ms DOUBLE,
        error VARCHAR,
        ts TIMESTAMP NOT NULL,
        next_attempt_at TIMESTAMP
    )
    """,
)

# An index made before a column existed gains it at start (see index.IndexDB).
ADDED_COLUMNS: Final = (
    ("jobs", "caller", "VARCHAR"),
    ("jobs", "batch_id", "VARCHAR"),
    ("jobs", "pinned_server", "VARCHAR"),
)

# Filling a column of `jobs` that an older index gains from the jobs' `queued` events, once.
_FILL_FROM_REQUEST: Final = """
    UPDATE jobs SET {0} = q.{0}
    FROM (SELECT job_id, any_value(data->'request'->>'{1}') AS {0}
          FROM events WHERE type = 'queued' GROUP BY job_id) AS q
    WHERE jobs.job_id = q.job_id AND jobs.{0} IS NULL AND q.{0} IS NOT NULL
"""
FILL_COLUMN: Final = {
    ("jobs", "caller"): _FILL_FROM_REQUEST.format("caller", "caller"),
    ("jobs", "batch_id"): _FILL_FROM_REQUEST.format("batch_id", "batch_id"),
    ("jobs", "pinned_server"): _FILL_FROM_REQUEST.format("pinned_server", "server"),
}

VIEW_BODIES: Final = {
    # One row per node execution: from its node_started to the next node_started or the end
    # of the attempt. The class comes from the event, else from the workflow in `queued`.
    "node_runs": """
    WITH marks AS (
        SELECT job_id, seq, ts, type, node_id, server_id, data->>'class_type' AS class_type,
               lead(ts) OVER (PARTITION BY job_id ORDER BY seq) AS next_ts
        FROM events
        WHERE type IN ('node_started', 'succeeded', 'failed', 'cancelled', 'retried')
    ),
    workflows AS (
        SELECT job_id, data->'request'->'workflow' AS workflow FROM events WHERE type = 'queued'
    )
    SELECT m.job_id, m.node_id,
           coalesce(m.class_type,
                    json_extract_string(w.workflow, '$."' || m.node_id || '".class_type'))
               AS class_type,
           m.server_id, m.ts AS started_at, m.next_ts AS finished_at,
           date_diff('microsecond', m.ts, m.next_ts) / 1e6 AS duration_s
    FROM marks m LEFT JOIN workflows w USING (job_id)
    WHERE m.type = 'node_started' AND m.next_ts IS NOT NULL
    """,
    "slowest_nodes": """
    SELECT coalesce(class_type, '?') AS class_type,
           count(*) AS runs,
           round(avg(duration_s), 3) AS avg_s,
           round(quantile_cont(duration_s, 0.5), 3) AS p50_s,
           round(quantile_cont(duration_s, 0.95), 3) AS p95_s,
           round(max(duration_s), 3) AS max_s,
           round(sum(duration_s), 3) AS total_s
    FROM node_runs
    GROUP BY 1
    ORDER BY avg_s DESC
    """,
    # Failures per server and error type, out of the jobs that finished on that server.
    "failure_rates": """
    WITH finished AS (
        SELECT * FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
    ),
    per_server AS (
        SELECT server_id, count(*) AS finished_jobs FROM finished GROUP BY server_id
    )
    SELECT f.server_id, f.error_type, count(*) AS failures, any_value(p.finished_jobs)
               AS finished_jobs,
           round(count(*) / any_value(p.finished_jobs), 4) AS failure_rate
    FROM finished f JOIN per_server p ON p.server_id IS NOT DISTINCT FROM f.server_id
    WHERE f.status = 'failed'
    GROUP BY f.server_id, f.error_type
    ORDER BY failure_rate DESC, failures DESC
    """,
    "daily_timing": """
    SELECT CAST(submitted_at AS DATE) AS day,
           count(*) AS jobs,
           count(started_at) AS started,
           count(finished_at) AS finished,
           round(avg(queue_wait_s), 3) AS avg_queue_wait_s,
           round(quantile_cont(queue_wait_s, 0.95), 3) AS p95_queue_wait_s,
           round(avg(duration_s), 3) AS avg_run_s,
           round(quantile_cont(duration_s, 0.95), 3) AS p95_run_s
    FROM jobs
    WHERE submitted_at IS NOT NULL
    GROUP BY day
    ORDER BY day
    """,
}

VIEW_NAMES: Final = tuple(VIEW_BODIES)
VIEWS: Final = tuple(
    f"CREATE OR REPLACE VIEW {name} AS {body}" for name, body in VIEW_BODIES.items()
)
# What a query scoped to one caller may name (tenancy shadows each with that caller's rows).
SCOPED_NAMES: Final = ("events", "jobs", "webhook_deliveries", *VIEW_NAMES)


# Epoch seconds (DOUBLE) to a UTC TIMESTAMP without depending on the session's time zone.
_TS = "make_timestamp(CAST(round({0} * 1e6) AS BIGINT))"

# A batch of new events as one JSON array of the events exactly as received; DuckDB parses it in
# one go (about 100x faster than a row at a time). The caller has left out the duplicates.
INSERT_EVENTS: Final = f"""
    INSERT INTO events
    SELECT e->>'$.event_id', e->>'$.job_id', CAST(e->>'$.seq' AS BIGINT),
           {_TS.format("CAST(e->>'$.ts' AS DOUBLE)")},
           e->>'$.type', e->>'$.server_id', e->>'$.data.node_id', e->'$.data'
    FROM (SELECT unnest(from_json($1, '["JSON"]')) AS e)
"""

# Which of these event ids the index holds: a scan of the whole column, for the few batches after
# a crash whose events may be in the index already (store.py).
KNOWN_EVENT_IDS: Final = """
    SELECT DISTINCT event_id FROM events WHERE event_id IN (SELECT unnest($1::VARCHAR[]))
"""

_DELTA_TYPES: Final = {
    "job_id": "VARCHAR",
    "log_file_path": "VARCHAR",
    "log_bytes": "BIGINT",
    "status": "VARCHAR",
    "status_seq": "BIGINT",
    "server_id": "VARCHAR",
    "attempts": "INTEGER",
    "submitted_at": "DOUBLE",
    "started_at": "DOUBLE",
    "finished_at": "DOUBLE",
    "error_type": "VARCHAR",
    "error_message": "VARCHAR",
    "workflow_hash": "VARCHAR",
    "node_count": "INTEGER",
    "output_count": "INTEGER",
    "event_count": "BIGINT",
    "last_seq": "BIGINT",
    "last_event_at": "DOUBLE",
    "caller": "VARCHAR",
    "batch_id": "VARCHAR",
    "pinned_server": "VARCHAR",
}
_DELTA_SCHEMA: Final = "[{" + ",".join(f'"{k}":"{v}"' for k, v in _DELTA_TYPES.items()) + "}]"

# One row per job of the batch, merged with the job's existing row (records.JobDelta).
UPSERT_JOBS: Final = f"""
    INSERT INTO jobs (job_id, status, server_id, attempts, submitted_at, started_at,
                      finished_at, error_type, error_message, workflow_hash, node_count,
                      output_count, log_file_path, event_count, last_seq, last_event_at,
                      status_seq, log_bytes, caller, batch_id, pinned_server)
    SELECT d.job_id, d.status, d.server_id, d.attempts, {_TS.format("d.submitted_at")},
           {_TS.format("d.started_at")}, {_TS.format("d.finished_at")}, d.error_type,
           d.error_message, d.workflow_hash, d.node_count, d.output_count, d.log_file_path,
           d.event_count, d.last_seq, {_TS.format("d.last_event_at")}, d.status_seq,
           d.log_bytes, d.caller, d.batch_id, d.pinned_server
    FROM (SELECT unnest(from_json($1, '{_DELTA_SCHEMA}'), recursive := true)) AS d
    ON CONFLICT (job_id) DO UPDATE SET
        status = CASE WHEN excluded.status_seq > jobs.status_seq
                      THEN excluded.status ELSE jobs.status END,
        status_seq = greatest(jobs.status_seq, excluded.status_seq),
        server_id = coalesce(excluded.server_id, jobs.server_id),
        attempts = greatest(jobs.attempts, excluded.attempts),
        submitted_at = least(jobs.submitted_at, excluded.submitted_at),
        started_at = least(jobs.started_at, excluded.started_at),
        finished_at = greatest(jobs.finished_at, excluded.finished_at),
        error_type = coalesce(excluded.error_type, jobs.error_type),
        error_message = coalesce(excluded.error_message, jobs.error_message),
        workflow_hash = coalesce(jobs.workflow_hash, excluded.workflow_hash),
        node_count = coalesce(jobs.node_count, excluded.node_count),
        output_count = coalesce(excluded.output_count, jobs.output_count),
        log_bytes = CASE WHEN excluded.log_file_path = jobs.log_file_path
                         THEN greatest(jobs.log_bytes, excluded.log_bytes)
                         ELSE excluded.log_bytes END,
        log_file_path = excluded.log_file_path,
        event_count = jobs.event_count + excluded.event_count,
        last_seq = greatest(jobs.last_seq, excluded.last_seq),
        last_event_at = greatest(jobs.last_event_at, excluded.last_event_at),
        caller = coalesce(jobs.caller, excluded.caller),
        batch_id = coalesce(jobs.batch_id, excluded.batch_id),
        pinned_server = coalesce(jobs.pinned_server, excluded.pinned_server)
"""

# A batch of webhook attempts (contract.WebhookAttempt) as one JSON array; each is stored once.
INSERT_ATTEMPTS: Final = f"""
    INSERT INTO webhook_deliveries
    SELECT a->>'$.attempt_id', a->>'$.delivery_id', a->>'$.job_id', a->>'$.event_type',
           CAST(a->>'$.event_seq' AS BIGINT), CAST(a->>'$.stream_seq' AS BIGINT),
           CAST(a->>'$.attempt' AS INTEGER), a->>'$.redelivery', a->>'$.url', a->>'$.outcome',
           CAST(a->>'$.status_code' AS INTEGER), CAST(a->>'$.latency_ms' AS DOUBLE),
           a->>'$.error', {_TS.format("CAST(a->>'$.ts' AS DOUBLE)")},
           {_TS.format("CAST(a->>'$.next_attempt_at' AS DOUBLE)")}
    FROM (SELECT unnest(from_json($1, '["JSON"]')) AS a)
    ON CONFLICT DO NOTHING
    RETURNING attempt_id
"""
