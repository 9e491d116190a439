"""What a new leader learns of run and load times from the log index, before it places a job.

The cost model is learnt online from the events the leader applies, so a leader that starts
(a restart, a handover) would place its first jobs on the fallbacks: every server alike, every
model a 5 s load. It asks the log sink instead, on `comfy.logs.query` as every gateway's
`/logs/query` does, for the jobs that most recently succeeded in one try: their server, run
time, workflow (for the shape) and node times (for the loaders), and learns from them as if it
had seen them run. Bounded: at most `JOBS` jobs in one reply (the sink cuts a reply to one
message, the newest jobs first), a few seconds' wait; with no answer the leader goes on from the
fallbacks and learns online. A sink that is not there yet (`up` starts it beside the gateway)
is asked again in the background, every second for a minute, until it answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from gateway.balancer.servers import ServerTable
from gateway.bus.contract import (
    ContractError,
    Error,
    LogQuery,
    LogQueryResult,
    Subjects,
    decode,
    encode,
)
from gateway.comfyui.shape import shape_of

log = logging.getLogger(__name__)

JOBS: Final = 500
# The sink's own limit on the query, and the leader's on the whole request: it does not hold
# back dispatching for longer than this.
_QUERY_S: Final = 2.0
WAIT_S: Final = 3.0
# While no sink answered: asked again this often, for this long, behind the dispatching.
_AGAIN_EVERY_S: Final = 1.0
_AGAIN_FOR_S: Final = 60.0

# Jobs that succeeded in one try (their run time is one attempt's), newest first, each with its
# workflow and the time of each node it ran, from its node_started to the next one or its end
# (as the leader times loaders live, gateway/balancer/loadclock.py).
# Their events are all stamped after the oldest one's submission: the filter on `ts` lets the
# index skip the older part of `events` (it has no key on job_id), which is most of it.
_SQL: Final = f"""
WITH recent AS (
    SELECT job_id, server_id, duration_s, submitted_at, finished_at FROM jobs
    WHERE status = 'succeeded' AND attempts = 1 AND server_id IS NOT NULL
      AND duration_s IS NOT NULL
    ORDER BY finished_at DESC
    LIMIT {JOBS}
),
theirs AS (
    SELECT job_id, seq, ts, type, node_id, data FROM events
    WHERE ts >= (SELECT min(submitted_at) FROM recent)
      AND job_id IN (SELECT job_id FROM recent)
      AND type IN ('queued', 'node_started', 'succeeded')
),
marks AS (
    SELECT job_id, node_id, type,
           date_diff('microsecond', ts, lead(ts) OVER (PARTITION BY job_id ORDER BY seq)) / 1e6
               AS took
    FROM theirs WHERE type IN ('node_started', 'succeeded')
),
nodes AS (
    SELECT job_id, CAST(json_group_object(node_id, took) AS VARCHAR) AS took
    FROM marks WHERE type = 'node_started' AND took IS NOT NULL
    GROUP BY job_id
)
SELECT r.server_id, r.duration_s, CAST(q.data->'request'->'workflow' AS VARCHAR), n.took
FROM recent r
JOIN theirs q ON q.job_id = r.job_id AND q.type = 'queued'
LEFT JOIN nodes n ON n.job_id = r.job_id
ORDER BY r.finished_at DESC
"""

_workflow: Final = msgspec.json.Decoder(dict[str, Any])
_node_times: Final = msgspec.json.Decoder(dict[str, float])


class HistoryLesson:
    """One leadership's lesson from the log index: asked at its start, and asked again in the
    background while no log sink has answered."""

    def __init__(self, nc: Client, subjects: Subjects, servers: ServerTable) -> None:
        self._nc, self._subjects, self._servers = nc, subjects, servers
        self.tasks: list[asyncio.Task[None]] = []  # the leader stops them with its own
        self.learnt: int | None = None  # jobs learnt from; None while no sink answered

    async def first(self, *, within: float = WAIT_S) -> None:
        """Ask once, `within` seconds at most."""
        self.learnt = await learn_from_history(
            self._nc, self._subjects, self._servers, within=within
        )

    def keep_asking(self) -> None:
        """If no sink answered, ask again in a task (in `tasks`) until one does."""
        if self.learnt is None and not self.tasks:
            log.info("no log sink answered: placing from defaults, asking it again meanwhile")
            self.tasks.append(asyncio.create_task(self._again(), name="balancer-history"))

    async def _again(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + _AGAIN_FOR_S
        try:
            while self.learnt is None and loop.time() < until:
                await asyncio.sleep(_AGAIN_EVERY_S)  # paced retries of a real request
                self.learnt = await learn_from_history(self._nc, self._subjects, self._servers)
        except Exception:  # dispatching goes on without it; say why it stopped
            log.exception("learning from the log index failed; placing from what runs teach")


async def learn_from_history(
    nc: Client, subjects: Subjects, servers: ServerTable, *, within: float = WAIT_S
) -> int | None:
    """Teach the server table's cost model the recent jobs the log index holds; how many,
    None when no log sink answered within `within` seconds (or none runs)."""
    query = LogQuery(sql=_SQL, max_rows=JOBS, timeout_s=min(_QUERY_S, within))
    try:
        reply = await nc.request(subjects.logs_query, encode(query), timeout=within)
    except (NatsError, TimeoutError) as exc:
        log.debug("no history of run times from the log sink: %s", exc)
        return None
    try:
        result = decode(reply.data, LogQueryResult)
    except ContractError:
        try:
            error = decode(reply.data, Error)
        except ContractError as exc:
            log.warning("the log sink's answer to the history query is unreadable: %s", exc)
        else:
            log.warning("the log sink refused the history query: %s", error.message)
        return 0
    learnt = 0
    for row in reversed(result.rows):  # oldest first: the newest runs are remembered last
        try:
            learnt += _learn(servers, row)
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            log.warning("skipping a job of the history that does not read: %s", exc)
    log.info("learnt run and load times from %d recent jobs of the log index", learnt)
    return learnt


def _learn(servers: ServerTable, row: list[Any]) -> int:
    server_id, seconds, workflow, took = row
    if not isinstance(server_id, str) or not isinstance(workflow, str):
        return 0
    shape = shape_of(_workflow.decode(workflow))
    times = _node_times.decode(took) if isinstance(took, str) else {}
    loads: dict[str, float] = {}
    for node_id, models in shape.loaders:
        if node_id in times:  # a loader served from the cache never started: it loaded nothing
            for model in models:
                loads[model] = loads.get(model, 0.0) + times[node_id] / len(models)
    for model, load in loads.items():
        servers.costs.observe_load(server_id, model, load)
    servers.costs.observe_run(server_id, shape, float(seconds), loads)
    servers.observe_run(server_id, float(seconds))
    return 1
