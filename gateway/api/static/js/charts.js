// Two charts, drawn as SVG: horizontal bars (a value per label) and a timeline (spans in time).

import { h, seconds } from "./dom.js";

const ROW = 22;
const LABEL_W = 180;
const PLOT_W = 520;

function shorten(text, room = 28) {
  const value = String(text ?? "");
  return value.length > room ? `${value.slice(0, room - 1)}…` : value;
}

/** Bars for `rows` ([{label, value}]), longest first as given; `unit` follows each value. */
export function barChart(rows, { unit = "" } = {}) {
  const top = Math.max(...rows.map((r) => r.value), 0) || 1;
  const height = rows.length * ROW + 6;
  return h(
    "svg",
    { class: "chart", width: LABEL_W + PLOT_W + 90, height, role: "img" },
    rows.map((row, i) => {
      const y = i * ROW + 3;
      const w = Math.max(1, (row.value / top) * PLOT_W);
      return h(
        "g",
        {},
        h("title", {}, `${row.label}: ${row.value}${unit}`),
        h("text", { x: LABEL_W - 6, y: y + 14, "text-anchor": "end" }, shorten(row.label)),
        h("rect", { class: "bar", x: LABEL_W, y, width: w, height: ROW - 6 }),
        h("text", { x: LABEL_W + w + 4, y: y + 14 }, `${row.value}${unit}`),
      );
    }),
  );
}

/**
 * A timeline: one row per span ([{label, start, end, kind}], epoch seconds; an open span ends
 * at `now`), on one time axis from the first start.
 */
export function timeline(spans, now = Date.now() / 1000) {
  if (!spans.length) return null;
  const t0 = Math.min(...spans.map((s) => s.start));
  const t1 = Math.max(...spans.map((s) => s.end ?? now), t0 + 0.001);
  const scale = PLOT_W / (t1 - t0);
  const height = spans.length * ROW + 24;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => ({ x: LABEL_W + f * PLOT_W, t: f * (t1 - t0) }));
  return h(
    "svg",
    { class: "chart timeline", width: LABEL_W + PLOT_W + 90, height, role: "img" },
    ticks.map((tick) =>
      h(
        "g",
        {},
        h("line", { class: "axis", x1: tick.x, x2: tick.x, y1: 0, y2: height - 18 }),
        h("text", { x: tick.x, y: height - 4, "text-anchor": "middle" }, seconds(tick.t)),
      ),
    ),
    spans.map((span, i) => {
      const y = i * ROW + 3;
      const x = LABEL_W + (span.start - t0) * scale;
      const length = (span.end ?? now) - span.start;
      const w = Math.max(2, length * scale);
      return h(
        "g",
        { class: "span", "data-kind": span.kind },
        h("title", {}, `${span.label}: ${seconds(length)}${span.end === null ? " (running)" : ""}`),
        h("text", { x: LABEL_W - 6, y: y + 14, "text-anchor": "end" }, shorten(span.label)),
        h("rect", { class: `bar ${span.kind || ""}`, x, y, width: w, height: ROW - 6 }),
        h("text", { x: x + w + 4, y: y + 14 }, seconds(length)),
      );
    }),
  );
}
