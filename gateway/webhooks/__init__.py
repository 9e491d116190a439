"""Signed webhooks: a job's events POSTed to the URL it names, retried until they land.

- `policy`: what a submission may ask for (event types, a target that is allowed, a secret);
- `feed`: the leading balancer turns an event a webhook wants into a work item (stream WEBHOOKS);
- `worker`: every gateway takes work items from one shared durable consumer and sends them;
- `signing` (Standard Webhooks), `target` (where a webhook may go), `retry` (the backoff).
"""
