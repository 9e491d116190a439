// One job: its timeline, its outputs played in place, its error, its log and its workflow.

import { cancelJob, retryJob } from "./actions.js";
import { ApiError, blobUrl, get } from "./api.js";
import { timeline } from "./charts.js";
import { badge, clock, h, note, seconds, show } from "./dom.js";
import { ENDS, followJob } from "./live.js";

/** The spans of a job's life from its events: queue waits, dispatches, nodes, the end. */
export function spansOf(entries) {
  const spans = [];
  let open = null;
  // A mark is an instant that does not end the span running then: cached nodes, an output.
  const mark = (label, kind, ts) => spans.push({ label, kind, start: ts, end: ts });
  const start = (label, kind, ts) => {
    if (open) open.end = ts;
    open = { label, kind, start: ts, end: null };
    spans.push(open);
  };
  for (const event of entries) {
    const data = event.data || {};
    if (event.type === "queued") start("queued", "wait", event.ts);
    else if (event.type === "retried") start(`retried: ${data.reason || ""}`, "wait", event.ts);
    else if (event.type === "dispatched") start(`dispatched to ${data.server_id}`, "wait", event.ts);
    else if (event.type === "running") start("starting on ComfyUI", "wait", event.ts);
    else if (event.type === "node_started") {
      start(`node ${data.node_id} ${data.class_type || ""}`.trim(), "node", event.ts);
    } else if (event.type === "node_cached") {
      mark(`cached: node ${(data.node_ids || []).join(", ")}`, "cached", event.ts);
    } else if (event.type === "node_output") {
      mark(`output of node ${data.node_id}`, "output", event.ts);
    } else if (ENDS.has(event.type)) {
      if (open) open.end = event.ts;
      open = null;
      spans.push({ label: event.type, kind: event.type === "failed" ? "failed" : "end", start: event.ts, end: event.ts });
    }
  }
  return spans;
}

function imagePath(key) {
  return `/images/${key.split("/").map(encodeURIComponent).join("/")}`;
}

function gallery(outputs, signal) {
  if (!outputs.length) return note("No outputs.", "empty");
  return h(
    "div",
    { class: "gallery" },
    outputs.map((output) => {
      const holder = h("div", {}, note("loading…"));
      const download = h("a", { download: output.filename }, `download ${output.filename}`);
      const type = output.content_type || "";
      blobUrl(imagePath(output.key), { signal })
        .then((url) => {
          download.href = url;
          if (type.startsWith("image/")) {
            show(holder, h("img", { src: url, alt: output.filename, dataset: { key: output.key } }));
          } else if (type.startsWith("video/")) {
            show(holder, h("video", { src: url, controls: true, loop: true, muted: true }));
          } else if (type.startsWith("audio/")) {
            show(holder, h("audio", { src: url, controls: true }));
          } else {
            show(holder, note(`${type || "a file"}: download it below`));
          }
        })
        .catch((error) => {
          if (!signal.aborted) show(holder, note(error.message, "error"));
        });
      return h(
        "figure",
        {},
        holder,
        h("figcaption", {}, `node ${output.node_id} · ${output.filename} · ${output.size} bytes `, h("br"), download),
      );
    }),
  );
}

function errorOf(error) {
  if (!error) return null;
  return h(
    "section",
    { class: "card", id: "error" },
    h("h2", { class: "error" }, `Failed: ${error.code}`),
    h("p", {}, error.message),
    error.node_id
      ? h("p", {}, "Failing node: ", h("strong", {}, `${error.node_id} ${error.node_type || ""}`))
      : null,
    error.exception_type ? h("p", { class: "mono" }, error.exception_type) : null,
    error.traceback && error.traceback.length ? h("pre", {}, error.traceback.join("")) : null,
  );
}

function summaryOf(event) {
  const data = event.data || {};
  switch (event.type) {
    case "queued":
      return `${Object.keys(data.request?.workflow || {}).length} nodes`;
    case "dispatched":
      return `to ${data.server_id}, attempt ${data.attempt}`;
    case "node_started":
      return `${data.node_id} ${data.class_type || ""}`;
    case "node_progress":
      return `${data.node_id} ${data.value}/${data.max}`;
    case "node_cached":
      return (data.node_ids || []).join(", ");
    case "node_output":
      return data.node_id;
    case "failed":
      return `${data.code}: ${data.message}`;
    case "retried":
    case "cancelled":
      return data.reason || "";
    case "succeeded":
      return `${(data.outputs || []).length} outputs`;
    default:
      return "";
  }
}

function logTable(entries) {
  return h(
    "table",
    { id: "log" },
    h("thead", {}, h("tr", {}, ["seq", "time", "event", "server", "what"].map((n) => h("th", {}, n)))),
    h(
      "tbody",
      {},
      entries.map((event) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, event.seq),
          h("td", {}, clock(event.ts)),
          h("td", {}, event.type),
          h("td", {}, event.server_id || ""),
          h("td", { class: "mono" }, summaryOf(event)),
        ),
      ),
    ),
  );
}

function textLink(name, text, label) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  return h("a", { href: url, download: name }, label);
}

export async function render(root, { signal, params }) {
  const jobId = params[0];
  const path = encodeURIComponent(jobId);
  const message = h("div");
  const say = (text, kind = "muted") => show(message, note(text, kind));
  const head = h("div");
  const chart = h("section", { class: "card", id: "timeline" });
  const outputs = h("section", { id: "outputs" });
  const failure = h("div");
  const log = h("section");
  const workflow = h("section");
  let status = null;
  let entries = [];

  const drawHead = () => {
    const open = !ENDS.has(status.status);
    const timings = status.timings || {};
    show(
      head,
      h("h1", {}, "Job ", h("span", { class: "mono", id: "job-id" }, jobId), " ", badge(status.status)),
      h(
        "p",
        { class: "muted" },
        `server ${status.server_id || "–"} · attempt ${status.attempts} · waited ${seconds(timings.queue_wait_s)}` +
          ` · ran ${seconds(timings.run_s)} · log ${status.log_file_path}`,
      ),
      h(
        "div",
        { class: "actions" },
        open
          ? h("button", { type: "button", dataset: { action: "cancel" }, onclick: onCancel }, "Cancel")
          : h("button", { type: "button", dataset: { action: "retry" }, onclick: onRetry }, "Retry"),
        textLink(`${jobId}.jsonl`, entries.map((e) => JSON.stringify(e)).join("\n"), "download log"),
      ),
    );
  };
  const drawEvents = () => {
    const svg = timeline(spansOf(entries));
    show(chart, h("h2", {}, "Timeline"), svg || note("No events yet."));
    show(log, h("h2", {}, `Log (${entries.length} events)`), logTable(entries));
    const queued = entries.find((e) => e.type === "queued");
    const graph = queued ? queued.data.request.workflow : null;
    show(
      workflow,
      h("h2", {}, "Workflow"),
      graph
        ? [h("pre", {}, JSON.stringify(graph, null, 2)), textLink(`${jobId}.workflow.json`, JSON.stringify(graph, null, 2), "download workflow")]
        : note("Not in the log yet."),
    );
  };
  const drawResult = () => {
    show(outputs, h("h2", {}, "Outputs"), ENDS.has(status.status) ? gallery(status.outputs || [], signal) : note("Not yet."));
    show(failure, errorOf(status.error));
  };
  // After the end, `result` waits for the record and the log to hold it (read your writes).
  const load = async (ended = false) => {
    status = await get(ended ? `/workflow/result/${path}?wait=30` : `/workflow/status/${path}`, { signal });
    entries = (await get(`/workflow/logs/${path}`, { signal })).entries;
    drawHead();
    drawEvents();
    drawResult();
  };
  // The job ended while its events were no longer kept (nor its log readable): `expired` tells
  // the end from its record. Neither the result nor the log would come (both wait for the
  // log), so the page shows the end it was told, and the record's outputs if it still has it.
  const showExpired = async (event) => {
    status.status = event.status;
    status.error = event.error;
    say(event.message);
    try {
      const now = await get(`/workflow/status/${path}`, { signal });
      if (ENDS.has(now.status)) status = now;
    } catch (error) {
      if (!signal.aborted) console.warn(`job ${jobId}: its record cannot be read:`, error);
    }
    drawHead();
    drawResult();
  };
  const onCancel = async () => {
    try {
      await cancelJob(jobId);
      say("cancelled");
      await load(true);
    } catch (error) {
      say(error.message, "error");
    }
  };
  const onRetry = async () => {
    try {
      const again = await retryJob(jobId);
      window.location.hash = `#/job/${encodeURIComponent(again.job_id)}`;
    } catch (error) {
      say(error.message, "error");
    }
  };

  show(root, message, head, failure, chart, outputs, log, workflow);
  try {
    await load();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) say(`No job ${jobId}.`, "error");
    else if (!signal.aborted) say(error.message, "error");
    return;
  }
  if (ENDS.has(status.status)) return;
  // The job's record trails its log: the log may hold the end already, and nothing follows it.
  if (entries.some((event) => ENDS.has(event.type))) {
    await load(true);
    return;
  }
  // Live until it ends: each new event extends the timeline and the log.
  const seen = new Set(entries.map((e) => e.seq));
  const after = entries.length ? Math.max(...seen) : null;
  let ended = false;
  let expired = null;
  try {
    ended = await followJob(jobId, {
      signal,
      after,
      onEvent: (event) => {
        if (event.type === "expired") {
          expired = event;
          return;
        }
        if (seen.has(event.seq)) return;
        seen.add(event.seq);
        entries.push(event);
        status.status = { queued: "queued", dispatched: "dispatched", running: "running" }[event.type] || status.status;
        drawHead();
        drawEvents();
      },
    });
  } catch (error) {
    if (!signal.aborted) say(`live updates stopped: ${error.message}`, "error");
  }
  if (signal.aborted) return;
  if (expired) await showExpired(expired);
  else if (ended) await load(true);
}
