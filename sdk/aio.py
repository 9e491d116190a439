"""`AsyncComfyUISDK`: the asyncio twin of ComfyUISDK, with the same methods."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gateway.api.schemas import BatchStatus, JobResult, QueueShare, ServerHealth
from gateway.bus.contract import ServerRecord
from sdk import _protocol as p
from sdk._retry import DEFAULT_RETRY_FOR_S
from sdk.errors import GatewayUnreachable

AsyncProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


class AsyncComfyUISDK:
    """Talk to a ComfyAutomate gateway from asyncio code.

    async with AsyncComfyUISDK("http://localhost:8000") as sdk:
        result = await sdk.execute_workflow(workflow)

    Requests answered 503 or 429 are retried for `retry_for` seconds, as ComfyUISDK's are.
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
        self._http = httpx.AsyncClient(base_url=self.gateway_url, headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncComfyUISDK:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> bytes:
        retries = p.retries_for(method, path, self.retry_for, kwargs)
        while True:
            try:
                reply = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise GatewayUnreachable(
                    f"no gateway answers at {self.gateway_url}: {exc}"
                ) from exc
            wait = None
            if retries is not None:
                wait = retries.wait(reply.status_code, reply.headers.get("retry-after"))
            if wait is None:
                return p.check(reply.status_code, reply.content, retries)
            await asyncio.sleep(wait)

    async def register_server(
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
        return p.server_record(await self._call("POST", "/servers", json=body))

    async def list_servers(self) -> list[ServerHealth]:
        return p.servers(await self._call("GET", "/servers"))

    async def get_servers_health(self) -> list[ServerHealth]:
        return await self.list_servers()

    async def remove_server(self, server_id: str) -> None:
        await self._call("DELETE", f"/servers/{server_id}")

    async def drain_server(self, server_id: str) -> ServerHealth:
        """Take a server out of service: no new jobs; those it holds finish (`jobs_held`)."""
        return p.server_health(await self._call("POST", p.server_path(server_id, "drain")))

    async def undrain_server(self, server_id: str) -> ServerHealth:
        """Put a drained server back in service."""
        return p.server_health(await self._call("POST", p.server_path(server_id, "undrain")))

    async def wait_drained(self, server_id: str, timeout: float | None = None) -> ServerHealth:
        """The server once it holds no jobs (or as it stands after `timeout` s, or once it is
        no longer draining)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        server = p.server_in(await self._call("GET", "/servers"), server_id)
        while not p.drain_settled(server) and time.monotonic() < deadline:
            await asyncio.sleep(max(0.0, min(p.DRAIN_POLL_S, deadline - time.monotonic())))
            server = p.server_in(await self._call("GET", "/servers"), server_id)
        return server

    async def get_queue(self) -> QueueShare:
        """The pending queue by caller: this key's jobs waiting and running, its cap, weight."""
        return p.queue_share(await self._call("GET", "/workflow/queue"))

    async def submit_workflow(
        self, workflow: Any, *, idempotency_key: str | None = None, **options: Any
    ) -> str:
        """Queue a workflow; returns its job id at once (see ComfyUISDK.submit_workflow)."""
        body = p.submission(workflow, **options)
        headers = p.submit_headers(idempotency_key, body, self.retry_for)
        content = await self._call("POST", "/workflow/submit", json=body, headers=headers)
        return p.job_result_id(content)

    async def execute_workflow(
        self,
        workflow: Any,
        *,
        on_progress: AsyncProgressCallback | None = None,
        raise_on_failure: bool = True,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> JobResult:
        """Run a workflow and return its result once it ends (see ComfyUISDK.execute_workflow)."""
        timeout = options.get("timeout") or self.timeout
        if on_progress is None:
            body = p.submission(workflow, **options)
            content = await self._call(
                "POST",
                "/workflow/execute",
                json=body,
                headers=p.submit_headers(idempotency_key, body, self.retry_for),
                timeout=timeout + 10,
            )
            result = p.job_result(content)
            if not p.finished(result):
                result = await self.wait(result.job_id, timeout=timeout)
        else:
            job_id = await self.submit_workflow(
                workflow, idempotency_key=idempotency_key, **options
            )
            async for event in self.stream_events(job_id):
                outcome = on_progress(event)
                if outcome is not None:
                    await outcome
            # The job's record follows its events by a moment: wait for it, don't just read it.
            result = await self.wait(job_id, timeout=timeout)
        return p.raise_if_failed(result) if raise_on_failure else result

    async def get_status(self, job_id: str) -> JobResult:
        return p.job_result(await self._call("GET", f"/workflow/status/{job_id}"))

    async def get_result(self, job_id: str) -> JobResult:
        return p.job_result(await self._call("GET", f"/workflow/result/{job_id}"))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        limit = timeout or self.timeout
        content = await self._call(
            "GET", f"/workflow/result/{job_id}", params={"wait": limit}, timeout=limit + 10
        )
        return p.job_result(content)

    async def cancel(self, job_id: str) -> JobResult:
        return p.job_result(await self._call("POST", f"/workflow/cancel/{job_id}"))

    async def stream_events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every event of the job, from the first, as it happens; ends with the job.

        A job ended longer ago than the events are kept ends with one `expired` event instead
        (its `status` and `error`). A stream that breaks is resumed after the last event seen
        (each event comes once); GatewayUnreachable after several breaks in a row.
        """
        async for event in self._resumed(
            f"/workflow/events/{job_id}", (), p.Resume(), job_id, ends=True
        ):
            yield event

    async def stream_fleet_events(
        self,
        *,
        status: Iterable[str] = (),
        server: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        caller: str | None = None,
        progress: bool = False,
        since: float | None = None,
        last_event_id: int = 0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every job's state changes, fleet-wide, as they happen; never ends. As
        ComfyUISDK.stream_fleet_events."""
        query = p.fleet_query(
            status=status,
            server=server,
            labels=labels,
            caller=caller,
            progress=progress,
            since=since,
        )
        resume = p.Resume("id", last_event_id)
        async for event in self._resumed("/events", query, resume, p.FLEET):
            yield event

    async def _resumed(
        self, path: str, query: p.Query, resume: p.Resume, what: str, *, ends: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """An event stream, resumed after the last event seen whenever it breaks; `ends`: it
        ends with the job's last event."""
        while True:
            parser = p.SSEParser()
            try:
                async with self._http.stream(
                    "GET",
                    path,
                    params=query,
                    headers=resume.headers(),
                    timeout=None,
                ) as reply:
                    if reply.status_code in p.RESUMABLE_STATUS:
                        raise httpx.TransportError(f"the gateway answered {reply.status_code}")
                    if reply.status_code >= 400:
                        p.check(reply.status_code, await reply.aread())
                    async for line in reply.aiter_lines():
                        resume.heard()
                        event = parser.feed(line)
                        if event is not None and resume.saw(event):
                            yield event
                            if ends and p.is_last_event(event):
                                return
                why = "it ended before the job did" if ends else "it ended"
            except httpx.TransportError as exc:
                why = str(exc) or type(exc).__name__
            await asyncio.sleep(resume.broke(what, why))

    async def submit_batch(
        self,
        workflows: Any,
        *,
        overrides: Sequence[Mapping[str, Any]] | None = None,
        batch_id: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> BatchStatus:
        """Submit many jobs under one batch id (see ComfyUISDK.submit_batch)."""
        batch_id = p.batch_id_for(batch_id, idempotency_key, self.retry_for)
        body = p.batch_submission(workflows, overrides=overrides, batch_id=batch_id, **options)
        headers = p.key_headers(idempotency_key)
        return p.batch_status(
            await self._call("POST", "/workflow/batch", json=body, headers=headers)
        )

    async def get_batch(self, batch_id: str) -> BatchStatus:
        return p.batch_status(await self._call("GET", f"/workflow/batch/{batch_id}"))

    async def wait_batch(self, batch_id: str, timeout: float | None = None) -> BatchStatus:
        """The batch once every job of it has ended (or as it stands after `timeout` s)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        batch = await self.get_batch(batch_id)
        while not batch.done and time.monotonic() < deadline:
            await asyncio.sleep(p.BATCH_POLL_S)
            batch = await self.get_batch(batch_id)
        return batch

    async def cancel_batch(self, batch_id: str) -> BatchStatus:
        return p.batch_status(await self._call("POST", f"/workflow/batch/{batch_id}/cancel"))

    async def list_jobs(
        self, *, status: str | None = None, server: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent jobs, newest first (from the log index), optionally filtered."""
        params = {k: v for k, v in {"status": status, "server": server}.items() if v}
        content = await self._call("GET", "/workflow/jobs", params={**params, "limit": limit})
        return p.json_list(content)

    async def get_logs(self, job_id: str) -> dict[str, Any]:
        return p.json_object(await self._call("GET", f"/workflow/logs/{job_id}"))

    async def query_logs(
        self, sql: str, max_rows: int | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"sql": sql}
        if max_rows is not None:
            body["max_rows"] = max_rows
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        return p.json_object(await self._call("POST", "/logs/query", json=body))

    async def download_outputs(self, result: JobResult, directory: str | Path) -> list[Path]:
        """Save every output of a result under `directory` (as `<job_id>/<file>`)."""
        saved = []
        for output in result.outputs:
            target = p.output_path(Path(directory), output.key)
            target.parent.mkdir(parents=True, exist_ok=True)
            async with self._http.stream("GET", output.url) as reply:
                if reply.status_code >= 400:
                    p.check(reply.status_code, await reply.aread())
                with target.open("wb") as fh:
                    async for chunk in reply.aiter_bytes():
                        fh.write(chunk)
            saved.append(target)
        return saved
