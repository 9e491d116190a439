// The dashboard's frame: pages by the URL's hash, the API key dialog, the system's health.

import { apiKey, get, onKeyNeeded } from "./api.js";
import { note, show } from "./dom.js";
import * as fleet from "./fleet.js";
import * as job from "./job.js";
import * as logs from "./logs.js";
import * as queue from "./queue.js";

const PAGES = { fleet, queue, logs, job };
const HEALTH_MS = 5000;

let current = null; // the shown page's AbortController: leaving a page stops its work

function route() {
  const [name, ...params] = window.location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  return PAGES[name] ? { name, params } : { name: "fleet", params: [] };
}

async function open() {
  if (current) current.abort();
  current = new AbortController();
  const { name, params } = route();
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const root = document.getElementById("page");
  root.dataset.page = name;
  try {
    await PAGES[name].render(root, { signal: current.signal, params });
  } catch (error) {
    if (!current.signal.aborted) show(root, note(error.message, "error"));
  }
}

function askForKey(error) {
  const dialog = document.getElementById("key-dialog");
  const message = document.getElementById("key-error");
  document.getElementById("key-button").hidden = false;
  if (apiKey.get() && error) {
    message.textContent = `That key was refused: ${error.message}`;
    message.hidden = false;
  } else {
    message.hidden = true;
  }
  if (!dialog.open) dialog.showModal();
}

function setUpKeyDialog() {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-form").addEventListener("submit", () => {
    if (!input.value.trim()) return;
    apiKey.set(input.value.trim());
    input.value = "";
    open();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    apiKey.clear();
    dialog.close();
    open();
  });
  document.getElementById("key-button").addEventListener("click", () => askForKey(null));
  if (apiKey.get()) document.getElementById("key-button").hidden = false;
  onKeyNeeded(askForKey);
}

async function showHealth() {
  const badge = document.getElementById("health");
  try {
    const reply = await fetch("/health");
    const report = await reply.json();
    badge.className = `badge ${report.status}`;
    badge.textContent = `system ${report.status}`;
    badge.title = report.missing && report.missing.length ? report.missing.join("; ") : "ready to take, run and log jobs";
  } catch (error) {
    badge.className = "badge unknown";
    badge.textContent = "gateway unreachable";
    badge.title = error.message;
  }
}

setUpKeyDialog();
window.addEventListener("hashchange", open);
showHealth();
setInterval(showHealth, HEALTH_MS);
open();
