"""Tuning of the log sink. The defaults suit one machine; tests shorten the waits."""

from __future__ import annotations

import msgspec

from gateway.logsink.messages import SINK_DURABLE


class SinkConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the sink consumes, batches, and sandboxes queries."""

    # JetStream consumer
    durable: str = SINK_DURABLE
    # Bigger batches amortise the commit, the job merge and the sync: 10,000 measured ~1.4x
    # the rate of 5,000 here. At low rates batches stay small (see linger_s).
    batch_size: int = 10_000
    # After the first event of a batch arrives, wait this long for more before writing. Each
    # batch costs a transaction and a sync whatever its size: at 9 events a job and 20 jobs/s,
    # 5 ms made batches of 1-3 events and ~11 ms of sink CPU per job; 50 ms cuts that to ~3.
    linger_s: float = 0.05
    # Events requested from JetStream ahead of the writer: keeps the pipe full while we write.
    prefetch: int = 40_000
    pull_expires_s: float = 5.0
    # An event not acked within this time is delivered again (after a crash of the sink).
    ack_wait_s: float = 30.0
    # Waits after a failed write, doubling up to the maximum.
    retry_min_s: float = 0.2
    retry_max_s: float = 5.0
    # Open JSONL files kept between batches (at most a quarter of the descriptor limit).
    open_files: int = 2048
    # DuckDB, for the whole database (the limits are per database, not per connection)
    memory_limit: str = "1GB"
    threads: int = 2
    # People's SQL (`<prefix>.logs.query`): at most this many at once, and per caller (one
    # caller for all queries without one); past either a query is refused (`busy`), not queued.
    query_workers: int = 4
    queries_per_caller: int = 2
    max_rows_cap: int = 100_000
    max_timeout_s: float = 60.0
    max_sql_bytes: int = 64 * 1024
    # The system's own reads (a job's log, the job list): a pool of their own, never behind SQL.
    read_workers: int = 2
    read_timeout_s: float = 10.0
    # Retention: a job whose last event is older than this loses its log file and index rows
    # (0: never). Looked for every `prune_every_s`, at most `prune_jobs` jobs per pass, so a
    # pass never holds the writer for long (passes follow each other while there are more).
    retention_s: float = 0.0
    prune_every_s: float = 600.0
    prune_jobs: int = 5_000
    # Warn when DuckDB uses this share of its memory limit, or the data folder's file system
    # has less than this share (or `min_free_bytes`) free; looked at every `watch_every_s`.
    warn_memory_share: float = 0.8
    warn_free_share: float = 0.05
    min_free_bytes: int = 1024**3
    watch_every_s: float = 60.0
