// Small helpers to build the pages: elements, numbers, times.

/**
 * An element: h("td", {class: "num", dataset: {job: id}, onclick: f}, "text", child, ...).
 * Children that are null, undefined or false are left out; arrays are flattened.
 */
export function h(tag, attributes = {}, ...children) {
  const svg = ["svg", "g", "rect", "line", "text", "title"].includes(tag);
  const element = svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && !svg && name !== "list") element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** Replace what `parent` shows with `children`. */
export function show(parent, ...children) {
  parent.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

export function badge(text) {
  return h("span", { class: `badge ${text}` }, text);
}

/** Seconds as people read them: 850 ms, 12.3 s, 4 min 5 s. */
export function seconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 60) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

/** A time the API gave (epoch seconds, or an ISO text from the log index) as epoch seconds. */
export function epoch(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return value;
  const text = /[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`; // the index keeps UTC
  const ms = Date.parse(text.replace(" ", "T"));
  return Number.isNaN(ms) ? null : ms / 1000;
}

/** How long ago an epoch time was, shortly. */
export function ago(value) {
  const at = epoch(value);
  if (at === null) return "–";
  return `${seconds(Math.max(0, Date.now() / 1000 - at))} ago`;
}

export function clock(value) {
  const at = epoch(value);
  return at === null ? "–" : new Date(at * 1000).toLocaleTimeString();
}

/** A message line for a failed call, or a note. */
export function note(text, kind = "muted") {
  return h("p", { class: kind }, text);
}
