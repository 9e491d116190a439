"""The log sink: every event into one JSONL file per job and a DuckDB index, queried over NATS.

Public surface (see README.md):
- paths: `log_file_path`, `log_file_relpath`, `index_path` (the gateway names a job's log file);
- running it: `run_logsink(settings, stop)`, `LogSink` (async context manager), `SinkConfig`;
- asking it: `query_logs`, `job_log`, `LogQueryError` (and `client.recent_jobs`); subjects
  `<prefix>.logs.query`, `<prefix>.logs.job` (`job_log_subject`), `<prefix>.logs.jobs` and
  `<prefix>.logs.cancel` (messages.py);
- recovery: `rebuild_index(data_dir)`;
- the CLI: `gateway.logsink.cli.add_parsers`.
"""

from gateway.logsink.client import LogQueryError, job_log, query_logs
from gateway.logsink.config import SinkConfig
from gateway.logsink.messages import JobLog, JobLogPage, JobLogRequest, job_log_subject
from gateway.logsink.paths import index_path, log_file_path, log_file_relpath
from gateway.logsink.rebuild import rebuild_index
from gateway.logsink.sink import LogSink, run_logsink

__all__ = [
    "JobLog",
    "JobLogPage",
    "JobLogRequest",
    "LogQueryError",
    "LogSink",
    "SinkConfig",
    "index_path",
    "job_log",
    "job_log_subject",
    "log_file_path",
    "log_file_relpath",
    "query_logs",
    "rebuild_index",
    "run_logsink",
]
