// Live job changes for the pages: the one module that knows where they come from.
//
// Every page sees the same shape, a "change":
//   {job_id, type, status, server_id, ts, attempt, node_id, class_type, value, max,
//    nodes, pinned, error, outputs}
// where `type` is the event's (queued, dispatched, running, node_started, node_progress,
// node_cached, retried, succeeded, failed, cancelled, ...) and `status` what it makes the job.
//
// Two sources give it:
// 1. The fleet-wide stream `GET /events` (SSE; `id:` a stream sequence, resumed with
//    Last-Event-ID; node progress only when asked for), mapped by fromFleetEvent().
// 2. Where a gateway does not serve it (404), the job list is polled and each open job is
//    followed through its own stream `GET /workflow/events/{id}`, mapped by fromJobEvent().
// Neither tells what its stream no longer keeps event by event: the fleet stream says `missed`
// (the list is read again), a job's stream `expired` with the job's end (a change as its end).

import { ApiError, followEvents, get } from "./api.js";

const FLEET_STREAM = "/events?progress=true";
const POLL_MS = 1500;
const FLEET_LIST_MS = 15000; // with the fleet stream, the list is only a check now and then
const MAX_FOLLOWED = 16; // per-job streams at once (the gateway limits streams per key)
const LIST_LIMIT = 100;

export const OPEN = new Set(["queued", "dispatched", "running"]);
export const ENDS = new Set(["succeeded", "failed", "cancelled"]);

const STATUS_OF = {
  queued: "queued",
  retried: "queued",
  dispatched: "dispatched",
  running: "running",
  succeeded: "succeeded",
  failed: "failed",
  cancelled: "cancelled",
};

function statusOf(type, fallback) {
  return STATUS_OF[type] || (type && type.startsWith("node_") ? "running" : fallback || null);
}

/** A change from one event of a job's own stream (the bus's Event as JSON). */
export function fromJobEvent(event) {
  if (event.type === "expired") return fromExpired(event);
  const data = event.data || {};
  const change = {
    job_id: event.job_id,
    type: event.type,
    status: statusOf(event.type),
    server_id: event.server_id || data.server_id || null,
    ts: event.ts,
    seq: event.seq,
    attempt: data.attempt ?? null,
    node_id: data.node_id ?? null,
    class_type: data.class_type ?? null,
    value: data.value ?? null,
    max: data.max ?? null,
    nodes: null,
    error: event.type === "failed" ? data : null,
    outputs: event.type === "succeeded" ? data.outputs || [] : null,
  };
  if (event.type === "queued" && data.request) {
    change.nodes = Object.keys(data.request.workflow || {}).length;
    change.pinned = data.request.server || null;
  }
  if (event.type === "node_cached") change.cached = data.node_ids || [];
  return change;
}

/** The end of a job whose events are gone: `expired` says it, from the job's record. */
function fromExpired(event) {
  return {
    job_id: event.job_id,
    type: event.type,
    status: event.status,
    server_id: null,
    ts: event.finished_at,
    seq: event.seq,
    attempt: null,
    node_id: null,
    class_type: null,
    value: null,
    max: null,
    nodes: null,
    error: event.error,
    outputs: null,
  };
}

/** Whether a job's stream ends with this event: the job's end, or `expired` telling it. */
export function endsStream(event) {
  return ENDS.has(event.type) || event.type === "expired";
}

/** A change from one event of the fleet-wide stream (GET /events, docs/API.md). */
export function fromFleetEvent(data) {
  const progress = data.progress || {};
  return {
    job_id: data.job_id,
    type: data.type,
    status: data.status,
    server_id: data.server_id,
    ts: data.ts,
    seq: data.seq,
    attempt: data.attempt,
    node_id: progress.node_id ?? null,
    class_type: progress.class_type ?? null,
    value: progress.value ?? null,
    max: progress.max ?? null,
    nodes: null,
    pinned: data.pinned,
    error: data.error,
    outputs: data.outputs,
    cached: data.cached,
  };
}

/**
 * Watch every job the key may see until `signal` aborts: `onJobs(rows)` with the newest jobs
 * (GET /workflow/jobs rows) now and then, `onChange(change)` as each job moves, and
 * `onMissed(missed)` once the list was read again after events the stream no longer keeps.
 */
export async function watchJobs({ onJobs, onChange, onError, onMissed = () => {}, signal }) {
  const refresh = async () => {
    try {
      const rows = await get(`/workflow/jobs?limit=${LIST_LIMIT}`, { signal });
      onJobs(rows);
      return rows;
    } catch (error) {
      if (!signal.aborted) onError(error);
      return [];
    }
  };
  // The stream starts well before the list was read, so that nothing falls between them even
  // when this browser's clock runs ahead of the gateway's; replayed changes converge.
  const since = Date.now() / 1000 - 30;
  const first = await refresh();
  try {
    await watchFleet({ onChange, onMissed, signal, refresh, since });
  } catch (error) {
    if (signal.aborted) return;
    if (!(error instanceof ApiError && error.status === 404)) onError(error);
    await pollAndFollow({ onChange, signal, refresh, first });
  }
}

async function watchFleet({ onChange, onMissed, signal, refresh, since }) {
  const timer = setInterval(refresh, FLEET_LIST_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
  // Jobs may have moved in the events that are gone: only the list can tell where they are.
  const resync = async (missed) => {
    await refresh();
    if (!signal.aborted) onMissed(missed);
  };
  try {
    await followEvents(`${FLEET_STREAM}&since=${since}`, {
      signal,
      onEvent: (event) => {
        if (event.data.type === "missed") resync(event.data);
        else onChange(fromFleetEvent(event.data));
      },
    });
  } finally {
    clearInterval(timer);
  }
}

async function pollAndFollow({ onChange, signal, refresh, first }) {
  const followed = new Map();
  const follow = (rows) => {
    for (const row of rows) {
      if (!OPEN.has(row.status) || followed.has(row.job_id)) continue;
      if (followed.size >= MAX_FOLLOWED) break;
      const done = followJob(row.job_id, { onChange, signal })
        .catch((error) => console.warn(`following job ${row.job_id} stopped:`, error))
        .finally(() => followed.delete(row.job_id));
      followed.set(row.job_id, done);
    }
  };
  follow(first);
  while (!signal.aborted) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (!signal.aborted) follow(await refresh());
  }
}

/**
 * Follow one job's own stream to its end, calling `onChange` for each event; resolves then,
 * with whether the end was seen (its event, or `expired`). Used by the job page as well,
 * which wants every event of its job.
 */
export async function followJob(jobId, { onChange, onEvent, signal, after = null }) {
  let ended = false;
  try {
    await followEvents(`/workflow/events/${encodeURIComponent(jobId)}`, {
      signal,
      lastEventId: after,
      onEvent: ({ data }) => {
        if (endsStream(data)) ended = true;
        if (onEvent) onEvent(data);
        if (onChange) onChange(fromJobEvent(data));
      },
    });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
  return ended;
}
