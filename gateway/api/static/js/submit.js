// Submitting a workflow from the page: one's own (API format), or a sample that any ComfyUI runs.

import { post } from "./api.js";
import { h, note, show } from "./dom.js";

// Core nodes only, no model: it runs on every ComfyUI, and on the fake ones of `up --simulate`.
const SAMPLE = {
  1: { class_type: "EmptyImage", inputs: { width: 256, height: 256, batch_size: 1, color: 3355545 } },
  2: { class_type: "ImageInvert", inputs: { image: ["1", 0] } },
  3: { class_type: "SaveImage", inputs: { images: ["2", 0], filename_prefix: "dashboard" } },
};

/** A card with a workflow box, a file picker and Submit; `onSubmitted(job_id)` after each. */
export function submitCard(onSubmitted) {
  const text = h("textarea", {
    id: "workflow",
    spellcheck: false,
    placeholder: "A workflow in ComfyUI's API format (Export (API) in ComfyUI), or load the sample",
  });
  const status = h("div");
  const file = h("input", { type: "file", accept: ".json,application/json" });
  file.addEventListener("change", async () => {
    if (file.files.length) text.value = await file.files[0].text();
  });
  const sample = h(
    "button",
    { type: "button", id: "load-sample", onclick: () => { text.value = JSON.stringify(SAMPLE, null, 2); } },
    "Load the sample",
  );
  const form = h(
    "form",
    {},
    text,
    h("div", { class: "actions" }, file, sample, h("button", { type: "submit", id: "submit-workflow" }, "Submit")),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let workflow;
    try {
      workflow = JSON.parse(text.value);
    } catch (error) {
      show(status, note(`not JSON: ${error.message}`, "error"));
      return;
    }
    try {
      const submitted = await post("/workflow/submit", { workflow });
      show(
        status,
        h("p", { class: "muted" }, "submitted ", h("a", { href: `#/job/${encodeURIComponent(submitted.job_id)}`, class: "mono" }, submitted.job_id)),
      );
      onSubmitted(submitted.job_id);
    } catch (error) {
      show(status, note(error.message, "error"));
    }
  });
  return h("section", { class: "card" }, h("h2", {}, "Run a workflow"), form);
}
