// SQL over the log index: the shipped views as saved queries, results as a table and a chart.

import { post } from "./api.js";
import { barChart } from "./charts.js";
import { h, note, show } from "./dom.js";

const MAX_ROWS = 1000;

// The views the log sink ships (docs/LOGGING.md), and two questions people ask first.
export const SAVED = [
  { name: "Time per node", sql: "SELECT class_type, avg_s, runs, p95_s FROM slowest_nodes ORDER BY avg_s DESC" },
  {
    name: "Jobs per hour",
    sql:
      "SELECT strftime(date_trunc('hour', submitted_at), '%Y-%m-%d %H:00') AS hour, count(*) AS jobs\n" +
      "FROM jobs GROUP BY 1 ORDER BY 1",
  },
  { name: "Recent jobs", sql: "SELECT job_id, status, server_id, duration_s, error_type FROM jobs ORDER BY submitted_at DESC LIMIT 50" },
  { name: "Failure rates", sql: "SELECT * FROM failure_rates" },
  { name: "Daily timing", sql: "SELECT * FROM daily_timing" },
  { name: "Node runs", sql: "SELECT * FROM node_runs ORDER BY started_at DESC LIMIT 100" },
  { name: "Slowest nodes", sql: "SELECT * FROM slowest_nodes" },
];

const NUMERIC = /^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|FLOAT|DOUBLE|DECIMAL.*)$/i;

function cell(value) {
  if (value === null || value === undefined) return h("span", { class: "muted" }, "null");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function csvOf(result) {
  const quote = (value) => {
    const text = value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
    return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  };
  const lines = [result.columns.map((c) => quote(c.name)).join(",")];
  for (const row of result.rows) lines.push(row.map(quote).join(","));
  return `${lines.join("\r\n")}\r\n`;
}

/** A bar chart of the first numeric column by the first other one, when the result has both. */
function chartOf(result) {
  const value = result.columns.findIndex((c) => NUMERIC.test(c.type));
  const label = result.columns.findIndex((c, i) => i !== value && !NUMERIC.test(c.type));
  if (value < 0 || !result.rows.length) return null;
  const rows = result.rows.slice(0, 40).map((row, i) => ({
    label: label < 0 ? String(i + 1) : String(row[label] ?? "null"),
    value: Number(row[value]) || 0,
  }));
  return h("div", {}, h("h2", {}, `${result.columns[value].name} by ${label < 0 ? "row" : result.columns[label].name}`), barChart(rows));
}

function resultOf(result) {
  const csv = URL.createObjectURL(new Blob([csvOf(result)], { type: "text/csv" }));
  return [
    h(
      "p",
      { class: "muted" },
      `${result.rows.length} rows${result.truncated ? ` (cut at ${MAX_ROWS})` : ""} in ${Math.round(result.elapsed_ms)} ms · `,
      h("a", { href: csv, download: "query.csv", id: "csv" }, "download CSV"),
    ),
    chartOf(result),
    h(
      "table",
      { id: "results" },
      h("thead", {}, h("tr", {}, result.columns.map((c) => h("th", { title: c.type }, c.name)))),
      h("tbody", {}, result.rows.map((row) => h("tr", {}, row.map((v) => h("td", {}, cell(v)))))),
    ),
  ];
}

export async function render(root, { signal }) {
  const sql = h("textarea", { id: "sql", spellcheck: false }, SAVED[0].sql);
  const output = h("div", { id: "query-result" });
  const run = async () => {
    show(output, note("running…"));
    try {
      const result = await post("/logs/query", { sql: sql.value, max_rows: MAX_ROWS }, { signal });
      show(output, resultOf(result));
    } catch (error) {
      if (!signal.aborted) show(output, note(error.message, "error"));
    }
  };
  const form = h("form", {}, sql, h("div", { class: "actions" }, h("button", { type: "submit", id: "run" }, "Run (Ctrl+Enter)")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  sql.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
  });
  const saved = h(
    "div",
    { class: "saved" },
    h("h2", {}, "Saved queries"),
    SAVED.map((query) =>
      h(
        "button",
        {
          type: "button",
          onclick: () => {
            sql.value = query.sql;
            run();
          },
        },
        query.name,
      ),
    ),
  );
  show(
    root,
    h("h1", {}, "Logs"),
    h(
      "p",
      { class: "muted" },
      "One read-only SELECT over the log index: tables events and jobs, views node_runs, slowest_nodes, failure_rates, daily_timing. A user key sees only its own jobs' rows.",
    ),
    h("div", { class: "columns" }, saved, h("div", {}, form, output)),
  );
  await run();
}
