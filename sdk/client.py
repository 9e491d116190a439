"""`ComfyUISDK`: the synchronous client of the gateway's REST API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gateway.api.schemas import BatchStatus, JobResult, QueueShare, ServerHealth
from gateway.bus.contract import ServerRecord
from sdk import _protocol as p
from sdk._retry import DEFAULT_RETRY_FOR_S
from sdk.errors import GatewayUnreachable

ProgressCallback = Callable[[dict[str, Any]], None]


class ComfyUISDK:
    """Talk to a ComfyAutomate gateway.

    sdk = ComfyUISDK(gateway_url="http://localhost:8000")
    result = sdk.execute_workflow(workflow)
    print(result["images"], result.log_file_path)

    A request the gateway answers 503 with a Retry-After (unavailable for a moment) or 429 (too
    many) is sent again, after the wait it names or a jittered backoff, for `retry_for` seconds
    in all (0: never); then Unavailable or RateLimited says so. Only reads, and submissions
    that name what they make, are sent again: each submission without an `idempotency_key` or
    `job_id` gets a key of its own (a batch without either, a `batch_id`), so a retry never
    makes a job twice.
    """

    def __init__(
        self,
        gateway_url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout: float = 300.0,
        retry_for: float = DEFAULT_RETRY_FOR_S,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.gateway_url = gateway_url.rstrip("/")
        self.timeout = timeout
        self.retry_for = retry_for
        self._http = httpx.Client(base_url=self.gateway_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ComfyUISDK:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> bytes:
        retries = p.retries_for(method, path, self.retry_for, kwargs)
        while True:
            try:
                reply = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise GatewayUnreachable(
                    f"no gateway answers at {self.gateway_url}: {exc}"
                ) from exc
            wait = None
            if retries is not None:
                wait = retries.wait(reply.status_code, reply.headers.get("retry-after"))
            if wait is None:
                return p.check(reply.status_code, reply.content, retries)
            time.sleep(wait)

    # -- servers ------------------------------------------------------------------------------

    def register_server(
        self,
        name: str,
        address: str,
        *,
        server_id: str | None = None,
        weight: float = 1.0,
        capacity: int = 2,
        labels: Mapping[str, str] | None = None,
    ) -> ServerRecord:
        """Add a ComfyUI server (`host:port`) to the fleet."""
        body = {
            "name": name,
            "address": address,
            "weight": weight,
            "capacity": capacity,
            "labels": dict(labels or {}),
        }
        if server_id is not None:
            body["server_id"] = server_id
        return p.server_record(self._call("POST", "/servers", json=body))

    def list_servers(self) -> list[ServerHealth]:
        return p.servers(self._call("GET", "/servers"))

    def get_servers_health(self) -> list[ServerHealth]:
        """Every server with its status, queue and last heartbeat."""
        return self.list_servers()

    def remove_server(self, server_id: str) -> None:
        self._call("DELETE", f"/servers/{server_id}")

    def drain_server(self, server_id: str) -> ServerHealth:
        """Take a server out of service: no new jobs; those it holds finish (`jobs_held`)."""
        return p.server_health(self._call("POST", p.server_path(server_id, "drain")))

    def undrain_server(self, server_id: str) -> ServerHealth:
        """Put a drained server back in service."""
        return p.server_health(self._call("POST", p.server_path(server_id, "undrain")))

    def wait_drained(self, server_id: str, timeout: float | None = None) -> ServerHealth:
        """The server once it holds no jobs (or as it stands after `timeout` s, or once it is
        no longer draining)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        server = p.server_in(self._call("GET", "/servers"), server_id)
        while not p.drain_settled(server) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(p.DRAIN_POLL_S, deadline - time.monotonic())))
            server = p.server_in(self._call("GET", "/servers"), server_id)
        return server

    def get_queue(self) -> QueueShare:
        """The pending queue by caller: this key's jobs waiting and running, its cap, weight."""
        return p.queue_share(self._call("GET", "/workflow/queue"))

    # -- jobs ---------------------------------------------------------------------------------

    def submit_workflow(
        self, workflow: Any, *, idempotency_key: str | None = None, **options: Any
    ) -> str:
        """Queue a workflow; returns its job id at once. Options as for execute_workflow.

        With `idempotency_key`, submitting the same workflow and options again (a retry after
        a lost answer) returns the same job instead of making another, for 24 h; the same key
        with anything else raises ApiError `idempotency_mismatch`.
        """
        body = p.submission(workflow, **options)
        headers = p.submit_headers(idempotency_key, body, self.retry_for)
        return str(
            p.job_result_id(self._call("POST", "/workflow/submit", json=body, headers=headers))
        )

    def execute_workflow(
        self,
        workflow: Any,
        *,
        on_progress: ProgressCallback | None = None,
        raise_on_failure: bool = True,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> JobResult:
        """Run a workflow and return its result once it ends.

        Options: overrides, inputs, server, labels, priority, max_attempts, timeout, job_id,
        webhook_url, webhook_events.
        `on_progress` is called with every event of the job as it happens. A failed or
        cancelled job raises JobFailed unless `raise_on_failure=False`. `idempotency_key`: as
        for submit_workflow; a repeat waits for the job the key made.
        """
        timeout = options.get("timeout") or self.timeout
        if on_progress is None:
            body = p.submission(workflow, **options)
            content = self._call(
                "POST",
                "/workflow/execute",
                json=body,
                headers=p.submit_headers(idempotency_key, body, self.retry_for),
                timeout=timeout + 10,
            )
            result = p.job_result(content)
            if not p.finished(result):
                result = self.wait(result.job_id, timeout=timeout)
        else:
            job_id = self.submit_workflow(workflow, idempotency_key=idempotency_key, **options)
            for event in self.stream_events(job_id):
                on_progress(event)
            # The job's record follows its events by a moment: wait for it, don't just read it.
            result = self.wait(job_id, timeout=timeout)
        return p.raise_if_failed(result) if raise_on_failure else result

    def get_status(self, job_id: str) -> JobResult:
        return p.job_result(self._call("GET", f"/workflow/status/{job_id}"))

    def get_result(self, job_id: str) -> JobResult:
        return p.job_result(self._call("GET", f"/workflow/result/{job_id}"))

    def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The job's result once it ends (or as it stands after `timeout` seconds)."""
        limit = timeout or self.timeout
        content = self._call(
            "GET", f"/workflow/result/{job_id}", params={"wait": limit}, timeout=limit + 10
        )
        return p.job_result(content)

    def cancel(self, job_id: str) -> JobResult:
        return p.job_result(self._call("POST", f"/workflow/cancel/{job_id}"))

    def stream_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every event of the job, from the first, as it happens; ends with the job.

        A job ended longer ago than the events are kept ends with one `expired` event instead
        (its `status` and `error`). A stream that breaks is resumed after the last event seen
        (each event comes once); GatewayUnreachable after several breaks in a row.
        """
        return self._resumed(f"/workflow/events/{job_id}", (), p.Resume(), job_id, ends=True)

    def stream_fleet_events(
        self,
        *,
        status: Iterable[str] = (),
        server: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        caller: str | None = None,
        progress: bool = False,
        since: float | None = None,
        last_event_id: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Every job's state changes, fleet-wide, as they happen (GET /events); never ends.

        Filters: `status` (queued, dispatched, running, retried, succeeded, failed,
        cancelled), `server`, `labels`, `caller` (admin keys; a user key gets its own jobs);
        `progress=True` adds the node events (node_started, node_progress, node_cached). It
        starts now, at `since` (epoch seconds), or after `last_event_id` (an event's `id`). A
        stream that breaks is resumed after the last event seen (each event comes once);
        GatewayUnreachable after several breaks in a row.
        """
        query = p.fleet_query(
            status=status,
            server=server,
            labels=labels,
            caller=caller,
            progress=progress,
            since=since,
        )
        return self._resumed("/events", query, p.Resume("id", last_event_id), p.FLEET)

    def _resumed(
        self, path: str, query: p.Query, resume: p.Resume, what: str, *, ends: bool = False
    ) -> Iterator[dict[str, Any]]:
        """An event stream, resumed after the last event seen whenever it breaks; `ends`: it
        ends with the job's last event."""
        while True:
            parser = p.SSEParser()
            try:
                with self._http.stream(
                    "GET",
                    path,
                    params=query,
                    headers=resume.headers(),
                    timeout=None,
                ) as reply:
                    if reply.status_code in p.RESUMABLE_STATUS:
                        raise httpx.TransportError(f"the gateway answered {reply.status_code}")
                    if reply.status_code >= 400:
                        p.check(reply.status_code, reply.read())
                    for line in reply.iter_lines():
                        resume.heard()
                        event = parser.feed(line)
                        if event is not None and resume.saw(event):
                            yield event
                            if ends and p.is_last_event(event):
                                return
                why = "it ended before the job did" if ends else "it ended"
            except httpx.TransportError as exc:
                why = str(exc) or type(exc).__name__
            time.sleep(resume.broke(what, why))

    # -- batches ------------------------------------------------------------------------------

    def submit_batch(
        self,
        workflows: Any,
        *,
        overrides: Sequence[Mapping[str, Any]] | None = None,
        batch_id: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> BatchStatus:
        """Submit many jobs under one batch id; the batch as it stands then.

        Either one workflow with `overrides`, a list of override sets (a job each), or a list
        of workflows. Options (inputs, server, labels, priority, max_attempts, timeout) are
        shared by every job. A `batch_id`, or an `idempotency_key`, makes a retry safe: the
        same batch sent again makes only the jobs not made yet.
        """
        batch_id = p.batch_id_for(batch_id, idempotency_key, self.retry_for)
        body = p.batch_submission(workflows, overrides=overrides, batch_id=batch_id, **options)
        headers = p.key_headers(idempotency_key)
        return p.batch_status(self._call("POST", "/workflow/batch", json=body, headers=headers))

    def get_batch(self, batch_id: str) -> BatchStatus:
        """The batch now: each job (status, outputs), `counts` by status, `done`."""
        return p.batch_status(self._call("GET", f"/workflow/batch/{batch_id}"))

    def wait_batch(self, batch_id: str, timeout: float | None = None) -> BatchStatus:
        """The batch once every job of it has ended (or as it stands after `timeout` s)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        batch = self.get_batch(batch_id)
        while not batch.done and time.monotonic() < deadline:
            time.sleep(p.BATCH_POLL_S)
            batch = self.get_batch(batch_id)
        return batch

    def cancel_batch(self, batch_id: str) -> BatchStatus:
        """Cancel every job of the batch not ended (and those not made yet)."""
        return p.batch_status(self._call("POST", f"/workflow/batch/{batch_id}/cancel"))

    # -- logs and outputs ---------------------------------------------------------------------

    def list_jobs(
        self, *, status: str | None = None, server: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent jobs, newest first (from the log index), optionally filtered."""
        params = {k: v for k, v in {"status": status, "server": server}.items() if v}
        content = self._call("GET", "/workflow/jobs", params={**params, "limit": limit})
        return p.json_list(content)

    def get_logs(self, job_id: str) -> dict[str, Any]:
        """The job's log: `entries` (every event), `entry_count`, `log_file_path`."""
        return p.json_object(self._call("GET", f"/workflow/logs/{job_id}"))

    def query_logs(
        self, sql: str, max_rows: int | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Run a SELECT on the log index: `columns`, `rows`, `truncated`."""
        body: dict[str, Any] = {"sql": sql}
        if max_rows is not None:
            body["max_rows"] = max_rows
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        return p.json_object(self._call("POST", "/logs/query", json=body))

    def download_outputs(self, result: JobResult, directory: str | Path) -> list[Path]:
        """Save every output of a result under `directory` (as `<job_id>/<file>`)."""
        saved = []
        for output in result.outputs:
            target = p.output_path(Path(directory), output.key)
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._http.stream("GET", output.url) as reply, target.open("wb") as fh:
                if reply.status_code >= 400:
                    p.check(reply.status_code, reply.read())
                for chunk in reply.iter_bytes():
                    fh.write(chunk)
            saved.append(target)
        return saved
