// The queue, live: pending jobs with why each waits, running ones node by node, recent ends.

import { cancelJob, retryJob } from "./actions.js";
import { get } from "./api.js";
import { ago, badge, epoch, h, note, seconds, show } from "./dom.js";
import { ENDS, watchJobs } from "./live.js";
import { submitCard } from "./submit.js";

const SERVERS_MS = 3000;
const RECENT_ENDS = 25;

/**
 * Why a queued job waits, as far as the fleet's health and its caller's share of the queue
 * (`share`: its entry of GET /workflow/queue) tell: the balancer binds a job only while its
 * caller is below its cap, to a healthy server below its capacity that is not draining (the
 * rule of `submit --wait`).
 */
export function waitingReason(servers, pinned = null, share = null) {
  if (share && share.at_cap) return `caller at its cap (${share.running} of ${share.max_running} jobs running)`;
  if (!servers) return "…";
  if (pinned) {
    servers = servers.filter((s) => s.server_id === pinned);
    if (!servers.length) return `server ${pinned} is not registered`;
    if (servers[0].draining) return `server ${pinned} is draining`;
  }
  if (!servers.length) return "no server is registered";
  let healthy = servers.filter((s) => s.status === "healthy");
  if (!healthy.length) {
    const why = servers
      .slice(0, 3)
      .map((s) => `${s.server_id} ${s.status}${s.reason ? `: ${s.reason}` : ""}`)
      .join("; ");
    return `no healthy server (${why})`;
  }
  if (healthy.every((s) => s.draining)) {
    const names = healthy.slice(0, 3).map((s) => s.server_id).join(", ");
    return `every healthy server is draining (${names})`;
  }
  healthy = healthy.filter((s) => !s.draining);
  const used = healthy.reduce((sum, s) => sum + Math.min(s.in_flight, s.capacity), 0);
  const room = healthy.reduce((sum, s) => sum + s.capacity, 0);
  if (used >= room) return `every healthy server is full (${used} of ${room} slots busy)`;
  return `waiting for the balancer (${used} of ${room} slots busy)`;
}

/** What the page knows of each job: the list's row, moved on by live changes. */
class Board {
  constructor() {
    this.jobs = new Map();
  }

  job(jobId) {
    if (!this.jobs.has(jobId)) {
      this.jobs.set(jobId, { job_id: jobId, status: "queued", done: new Set(), live: false });
    }
    return this.jobs.get(jobId);
  }

  fromRows(rows) {
    for (const row of rows) {
      const job = this.job(row.job_id);
      const status = job.status;
      Object.assign(job, row);
      if (row.pinned_server) job.pinned = row.pinned_server;
      // The index trails the live stream: an open status there does not undo what was seen.
      if (ENDS.has(status) || (job.live && !ENDS.has(row.status))) job.status = status;
    }
  }

  apply(change) {
    const job = this.job(change.job_id);
    job.live = true;
    if (ENDS.has(job.status) && !ENDS.has(change.status)) return;
    if (change.status) job.status = change.status;
    if (change.server_id) job.server_id = change.server_id;
    if (change.nodes) job.nodes = change.nodes;
    if (change.pinned) job.pinned = change.pinned;
    if (change.caller) job.caller = change.caller;
    if (change.type === "queued" && change.ts) job.submitted_at = job.submitted_at || change.ts;
    if (change.type === "running" || change.type === "retried") job.done = new Set();
    if (change.type === "running") job.started = change.ts;
    if (change.cached) change.cached.forEach((id) => job.done.add(id));
    if (change.type === "node_started") {
      if (job.current) job.done.add(job.current.node_id);
      job.current = { node_id: change.node_id, class_type: change.class_type, value: 0, max: 0 };
    }
    if (change.type === "node_progress" && job.current && job.current.node_id === change.node_id) {
      job.current.value = change.value;
      job.current.max = change.max;
    }
    if (ENDS.has(change.status)) {
      job.finished_at = change.ts;
      job.current = null;
      if (change.error) job.error_message = change.error.message;
    }
  }

  byStatus(statuses) {
    return [...this.jobs.values()].filter((job) => statuses.has(job.status));
  }
}

function jobLink(jobId) {
  return h("a", { href: `#/job/${encodeURIComponent(jobId)}`, class: "mono" }, jobId);
}

function progressOf(job) {
  const total = job.nodes || null;
  const done = job.done.size;
  const current = job.current;
  const bar = h("span");
  const fraction = current && current.max ? current.value / current.max : 0;
  bar.style.width = `${total ? Math.min(100, (100 * (done + fraction)) / total) : 100 * fraction}%`;
  return h(
    "div",
    {},
    h("div", { class: "progress" }, bar),
    h(
      "div",
      { class: "muted", dataset: { node: current ? current.node_id : "" } },
      current
        ? `node ${current.node_id} ${current.class_type || ""}` +
            (current.max ? ` ${current.value}/${current.max}` : "") +
            ` · ${done}${total ? `/${total}` : ""} nodes done`
        : job.status === "running" ? "starting…" : "bound, not started",
    ),
  );
}

function table(headers, rows, empty) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, empty))),
  );
}

export async function render(root, { signal }) {
  const board = new Board();
  let servers = null;
  let shares = new Map(); // caller -> its entry of GET /workflow/queue
  const message = h("div");
  const say = (text, kind = "muted") => show(message, note(text, kind));
  const pending = h("section");
  const running = h("section");
  const ended = h("section");

  // The rows are drawn anew with every event: a click whose press and release straddle a
  // redraw reaches no button. So the buttons only name their action and job, and the action is
  // taken on the release, from the button under it (a keyboard's click has no pointer).
  const button = (label, action, job) =>
    h("button", { type: "button", dataset: { action, job: job.job_id } }, label);
  const onCancel = async (job) => {
    try {
      await cancelJob(job.job_id);
      board.apply({ job_id: job.job_id, type: "cancelled", status: "cancelled", ts: Date.now() / 1000 });
      say(`cancelled ${job.job_id}`);
      draw();
    } catch (error) {
      say(error.message, "error");
    }
  };
  const onRetry = async (job) => {
    try {
      const again = await retryJob(job.job_id);
      say(`submitted again as ${again.job_id}`);
      board.apply({ job_id: again.job_id, type: "queued", status: "queued", ts: Date.now() / 1000 });
      draw();
    } catch (error) {
      say(error.message, "error");
    }
  };

  const handlers = { cancel: onCancel, retry: onRetry };
  const act = (event) => {
    const target = event.target.closest("button[data-action]");
    if (target) handlers[target.dataset.action]?.({ job_id: target.dataset.job });
  };
  for (const section of [pending, running, ended]) {
    section.addEventListener("pointerup", (event) => {
      if (event.button === 0) act(event);
    });
    section.addEventListener("click", (event) => {
      if (event.detail === 0) act(event);
    });
  }

  const rowOf = (job, cells, actions) =>
    h("tr", { dataset: { job: job.job_id, status: job.status } }, cells.map((c) => h("td", {}, c)), h("td", {}, actions));

  let scheduled = false;
  const draw = () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      const byAge = (a, b) => (epoch(b.submitted_at) ?? 0) - (epoch(a.submitted_at) ?? 0);
      show(
        pending,
        h("h2", {}, "Pending"),
        table(
          ["Job", "Submitted", "Why it waits", ""],
          board.byStatus(new Set(["queued"])).sort(byAge).map((job) =>
            rowOf(
              job,
              [jobLink(job.job_id), ago(job.submitted_at), h("span", { class: "reason" }, waitingReason(servers, job.pinned, shares.get(job.caller)))],
              button("Cancel", "cancel", job),
            ),
          ),
          "Nothing waits.",
        ),
      );
      show(
        running,
        h("h2", {}, "Running"),
        table(
          ["Job", "Status", "Server", "Progress", ""],
          board.byStatus(new Set(["dispatched", "running"])).sort(byAge).map((job) =>
            rowOf(
              job,
              [jobLink(job.job_id), badge(job.status), job.server_id || "–", progressOf(job)],
              button("Cancel", "cancel", job),
            ),
          ),
          "Nothing runs.",
        ),
      );
      const ends = board.byStatus(ENDS).sort(byAge).slice(0, RECENT_ENDS);
      show(
        ended,
        h("h2", {}, "Recent ends"),
        table(
          ["Job", "Status", "Server", "Took", "Error", ""],
          ends.map((job) =>
            rowOf(
              job,
              [
                jobLink(job.job_id),
                badge(job.status),
                job.server_id || "–",
                seconds(job.duration_s ?? null),
                job.error_message ? h("span", { class: "error" }, job.error_message) : "",
              ],
              button("Retry", "retry", job),
            ),
          ),
          "No job has ended yet.",
        ),
      );
    });
  };

  const refreshServers = async () => {
    try {
      servers = await get("/servers", { signal });
      const queue = await get("/workflow/queue", { signal });
      shares = new Map(queue.callers.map((share) => [share.caller, share]));
      draw();
    } catch (error) {
      if (!signal.aborted) say(error.message, "error");
    }
  };
  const submitted = (jobId) => {
    board.apply({ job_id: jobId, type: "queued", status: "queued", ts: Date.now() / 1000 });
    draw();
  };
  show(root, h("h1", {}, "Queue"), message, pending, running, ended, submitCard(submitted));
  draw();
  await refreshServers();
  const timer = setInterval(refreshServers, SERVERS_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
  watchJobs({
    signal,
    onJobs: (rows) => {
      board.fromRows(rows);
      draw();
    },
    onChange: (change) => {
      board.apply(change);
      draw();
    },
    onError: (error) => say(error.message, "error"),
    onMissed: (missed) =>
      say(`events ${missed.from_id} to ${missed.to_id} are no longer kept: the job list was read again`),
  });
}
