// Calls to the gateway's REST API, with the API key a person entered (kept for this tab only).

const KEY_NAME = "comfyautomate.api-key";
// How often a broken event stream is resumed before the page says it is gone.
const STREAM_RETRIES = 8;

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the gateway answered ${status}`);
    this.status = status;
    this.code = (body && body.code) || String(status);
    this.details = body && body.details;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (value) => sessionStorage.setItem(KEY_NAME, value),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

let keyNeeded = () => {};

/** Call `callback(error)` whenever the gateway wants a key, or a better one (app.js asks). */
export function onKeyNeeded(callback) {
  keyNeeded = callback;
}

function headers(extra) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(reply) {
  const text = await reply.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { message: text };
  }
  const error = new ApiError(reply.status, body);
  // 401: no key sent; 403 `forbidden`: a key this gateway does not know. A user key on an
  // admin route is 403 `admin_only`: that one is shown where it happened instead.
  if (reply.status === 401 || error.code === "forbidden") keyNeeded(error);
  return error;
}

/** A JSON request; resolves to the answer's JSON (null when empty), rejects with ApiError. */
export async function request(method, path, body, { signal } = {}) {
  const init = { method, signal, headers: headers({}) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const reply = await fetch(path, init);
  if (!reply.ok) throw await failure(reply);
  const text = await reply.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, options) => request("GET", path, undefined, options);
export const post = (path, body, options) => request("POST", path, body ?? {}, options);
export const remove = (path, options) => request("DELETE", path, undefined, options);

/**
 * Whether the key in use is an admin's (GET /whoami), so a page offers the fleet's changes
 * only to those who may make them; the gateway refuses them to others all the same.
 */
export async function isAdmin({ signal } = {}) {
  try {
    return (await get("/whoami", { signal })).role === "admin";
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    // 404: a gateway from before /whoami, which answers for itself. Any other refusal: no key
    // yet, or one it does not know (the key dialog asks), and no changes are offered.
    return error.status === 404;
  }
}

/** A stored file as a blob: URL, since an <img src> cannot send the key. */
export async function blobUrl(path, { signal } = {}) {
  const reply = await fetch(path, { headers: headers({}), signal });
  if (!reply.ok) throw await failure(reply);
  return URL.createObjectURL(await reply.blob());
}

/**
 * Follow a Server-Sent Events stream (by fetch: EventSource cannot send a key), calling
 * `onEvent({id, data})` for each event. A broken connection is resumed after the last id seen
 * (`Last-Event-ID`), a few times with a growing pause; resolves when the server ends the
 * stream or `signal` aborts, rejects with ApiError when the gateway refuses it.
 */
export async function followEvents(path, { onEvent, signal, lastEventId = null }) {
  let lastId = lastEventId;
  for (let attempt = 0; ; attempt += 1) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId !== null) extra["Last-Event-ID"] = String(lastId);
      const reply = await fetch(path, { headers: headers(extra), signal });
      if (!reply.ok) throw await failure(reply);
      await readEvents(reply.body, (event) => {
        if (event.id !== null) lastId = event.id;
        onEvent(event);
        attempt = 0;
      });
      return;
    } catch (error) {
      if (signal && signal.aborted) return;
      const refused = error instanceof ApiError && error.status < 500;
      if (refused || attempt >= STREAM_RETRIES) throw error;
      await pause(Math.min(500 * 2 ** attempt, 8000), signal);
    }
  }
}

async function readEvents(body, emit) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseBlock(block);
      if (event) emit(event);
    }
  }
}

function parseBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { id, data: JSON.parse(data.join("\n")) };
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}
