// The fleet: every server with its health, load, capacity, speed and capabilities; add, drain,
// undrain, remove.

import { get, isAdmin, post, remove } from "./api.js";
import { badge, h, note, seconds, show } from "./dom.js";

const REFRESH_MS = 2000;

function meter(used, of) {
  const bar = h("span");
  bar.style.width = `${Math.min(100, (100 * used) / Math.max(of, 1))}%`;
  return h("span", { class: "meter", title: `${used} of ${of}` }, bar);
}

function tags(map) {
  const entries = Object.entries(map || {});
  if (!entries.length) return h("span", { class: "muted" }, "–");
  return h("span", { class: "tags" }, entries.map(([k, v]) => h("span", {}, `${k}=${v}`)));
}

/** A draining server's state: "draining" while it holds jobs, "drained" once it is empty. */
function drainState(server) {
  if (!server.draining) return null;
  const held = server.jobs_held;
  const drained = held === 0;
  const note = drained
    ? "no jobs left: safe to stop"
    : held === null || held === undefined
      ? "finishing its jobs"
      : `${held} job${held === 1 ? "" : "s"} left to finish`;
  return [badge(drained ? "drained" : "draining"), h("div", { class: "muted drain" }, note)];
}

function row(server, { onRemove, onDrain, admin }) {
  const draining = Boolean(server.draining);
  return h(
    "tr",
    { dataset: { server: server.server_id, status: server.status, draining: String(draining) } },
    h("td", {}, h("strong", {}, server.server_id), h("div", { class: "muted" }, server.name)),
    h(
      "td",
      {},
      badge(server.status),
      server.reason ? h("div", { class: "muted" }, server.reason) : null,
      drainState(server),
    ),
    h("td", {}, server.last_seen_s === null ? "never" : `${seconds(server.last_seen_s)} ago`),
    h(
      "td",
      {},
      meter(server.in_flight, server.capacity),
      `${server.in_flight} / ${server.capacity} jobs`,
      h("div", { class: "muted" }, `ComfyUI: ${server.queue_running} running, ${server.queue_pending} pending`),
    ),
    h("td", { class: "num" }, server.seconds_per_job === null ? "–" : `${seconds(server.seconds_per_job)} / job`),
    h(
      "td",
      {},
      server.device || h("span", { class: "muted" }, "–"),
      h("div", { class: "muted" }, `${server.node_types} node types`),
      tags(server.models),
    ),
    h("td", {}, tags(server.labels)),
    h("td", { class: "mono" }, server.address ?? h("span", { class: "muted" }, "hidden")),
    h(
      "td",
      { class: "actions" },
      // A user key may not change the fleet (403 admin_only): it is not offered the buttons.
      admin && h(
        "button",
        {
          type: "button",
          dataset: { action: draining ? "undrain" : "drain" },
          title: draining ? "take jobs again" : "take no new jobs; finish those it holds",
          onclick: () => onDrain(server),
        },
        draining ? "Undrain" : "Drain",
      ),
      admin && h(
        "button",
        { type: "button", class: "danger", dataset: { action: "remove" }, onclick: () => onRemove(server) },
        "Remove",
      ),
    ),
  );
}

function labelsOf(text) {
  const labels = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const [key, ...rest] = part.split("=");
    labels[key.trim()] = rest.join("=").trim();
  }
  return labels;
}

function addForm(onAdded, say) {
  const name = h("input", { name: "name", placeholder: "name", required: true });
  const address = h("input", { name: "address", placeholder: "host:port", required: true });
  const capacity = h("input", { name: "capacity", type: "number", min: 1, max: 64, value: 2 });
  const labels = h("input", { name: "labels", placeholder: "labels: gpu=4090, zone=a" });
  const form = h(
    "form",
    { class: "inline" },
    name,
    address,
    capacity,
    labels,
    h("button", { type: "submit" }, "Add server"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say("adding…");
    try {
      const body = {
        name: name.value.trim(),
        address: address.value.trim(),
        capacity: Number(capacity.value) || 2,
        labels: labelsOf(labels.value),
      };
      const added = await post("/servers", body);
      say(`added ${added.server_id}`);
      form.reset();
      onAdded();
    } catch (error) {
      say(error.message, "error");
    }
  });
  return form;
}

export async function render(root, { signal }) {
  const admin = await isAdmin({ signal });
  const status = h("div");
  const say = (text, kind = "muted") => show(status, note(text, kind));
  const table = h("tbody");
  const summary = h("p", { class: "muted" });
  const refresh = async () => {
    try {
      const servers = await get("/servers", { signal });
      const healthy = servers.filter((s) => s.status === "healthy").length;
      show(
        summary,
        `${servers.length} servers, ${healthy} healthy · `,
        h("a", { href: "#/queue" }, "run a workflow and watch it on the Queue page"),
      );
      show(
        table,
        servers.length
          ? servers.map((s) => row(s, { onRemove, onDrain, admin }))
          : h("tr", {}, h("td", { colspan: 9, class: "empty" }, admin ? "No server yet: add one below." : "No server yet.")),
      );
    } catch (error) {
      if (!signal.aborted) say(error.message, "error");
    }
  };
  const onDrain = async (server) => {
    const verb = server.draining ? "undrain" : "drain";
    try {
      await post(`/servers/${encodeURIComponent(server.server_id)}/${verb}`);
      say(server.draining ? `${server.server_id} takes jobs again` : `draining ${server.server_id}`);
      await refresh();
    } catch (error) {
      say(error.message, "error");
    }
  };
  const onRemove = async (server) => {
    if (!window.confirm(`Remove ${server.server_id} for good? Jobs waiting for it fail.`)) return;
    try {
      await remove(`/servers/${encodeURIComponent(server.server_id)}`);
      say(`removed ${server.server_id}`);
      await refresh();
    } catch (error) {
      say(error.message, "error");
    }
  };
  show(
    root,
    h("h1", {}, "Fleet"),
    summary,
    h(
      "table",
      { id: "servers" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Server", "Health", "Last heartbeat", "Load", "Speed", "Device and models", "Labels", "Address", ""].map(
            (name) => h("th", {}, name),
          ),
        ),
      ),
      table,
    ),
    admin
      ? [h("h2", {}, "Add a server"), h("section", { class: "card" }, addForm(refresh, say), status)]
      : [status, note("Adding, draining and removing servers needs an admin key.")],
  );
  await refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}
