// What a person can do to a job from any page: cancel it, or run it again.

import { get, post } from "./api.js";

export async function cancelJob(jobId) {
  return post(`/workflow/cancel/${encodeURIComponent(jobId)}`);
}

/** The request a job was submitted with, from the `queued` event in its log. */
export async function requestOf(jobId) {
  const log = await get(`/workflow/logs/${encodeURIComponent(jobId)}`);
  const queued = log.entries.find((entry) => entry.type === "queued");
  if (!queued) throw new Error(`the log of ${jobId} does not hold its request yet`);
  return queued.data.request;
}

/** Submit the job's request again, as a new job; resolves to the answer (with `job_id`). */
export async function retryJob(jobId) {
  const request = await requestOf(jobId);
  return post("/workflow/submit", {
    workflow: request.workflow,
    overrides: request.overrides || {},
    inputs: request.inputs || [],
    server: request.server ?? null,
    labels: request.labels || {},
    priority: request.priority || 0,
    max_attempts: request.max_attempts,
    timeout: request.timeout_s ?? null,
    metadata: { ...(request.metadata || {}), retry_of: jobId },
  });
}
