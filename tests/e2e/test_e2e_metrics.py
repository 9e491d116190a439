"""`/metrics` over the real system: jobs that succeed, fail and are cancelled move the counters
and histograms by exactly what happened, and the log sink's lag counts the events it missed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, sse_events, tiny
from tests.helpers import poll_until

Key = tuple[str, frozenset[tuple[str, str]]]


async def _scrape(client: httpx.AsyncClient) -> dict[Key, float]:
    """Every sample of /metrics, by name and labels, read by prometheus_client's own parser."""
    reply = await client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def _delta(
    before: Mapping[Key, float], after: Mapping[Key, float], name: str, **labels: str
) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _series(samples: Mapping[Key, float], name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for (sample, labels), _ in samples.items() if sample == name}


async def _status(client: httpx.AsyncClient, job_id: str) -> str:
    return str((await client.get(f"/workflow/status/{job_id}")).json()["status"])


async def test_jobs_move_the_counters_and_histograms_by_what_happened(system: System) -> None:
    async with asyncio.TaskGroup() as group:
        group.create_task(system.add_server("ok"))
        group.create_task(system.add_server("bad", SimulatorConfig(fail_nodes=["ImageInvert"])))
        group.create_task(system.add_server("stuck", SimulatorConfig(hang_queue=True)))
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        before = await _scrape(client)

        async def execute(seed: int, server: str) -> dict[str, Any]:
            body = {"workflow": tiny(seed), "server": server}
            reply = await client.post("/workflow/execute", json=body)
            assert reply.status_code == 200, reply.text
            return dict(reply.json())

        succeeded = await execute(1, "ok")
        failed = await execute(2, "bad")
        submitted = await client.post(
            "/workflow/submit", json={"workflow": tiny(3), "server": "ok"}
        )
        assert submitted.status_code == 202
        waited = (await client.get(f"/workflow/result/{submitted.json()['job_id']}?wait=30")).json()
        held = (
            await client.post("/workflow/submit", json={"workflow": tiny(4), "server": "stuck"})
        ).json()["job_id"]
        await poll_until(
            lambda: _has_status(client, held, "dispatched"), "the held job on its server"
        )
        cancelled = await client.post(f"/workflow/cancel/{held}")
        assert cancelled.status_code == 200
        assert [succeeded["status"], failed["status"], waited["status"]] == [
            "succeeded",
            "failed",
            "succeeded",
        ]
        # Straight after the last answer: a scrape counts every event stored before it.
        after = await _scrape(client)

        assert _delta(before, after, "comfyautomate_jobs_submitted_total") == 4
        finished = "comfyautomate_jobs_finished_total"
        assert _delta(before, after, finished, outcome="succeeded", server="ok", reason="") == 2
        assert (
            _delta(
                before, after, finished, outcome="failed", server="bad", reason="execution_error"
            )
            == 1
        )
        assert _delta(before, after, finished, outcome="cancelled", server="stuck", reason="") == 1
        assert len(_series(after, finished)) == 3
        assert not _series(after, "comfyautomate_jobs_retried_total")

        # One wait per start and one run per end that followed a start: the held job never
        # started. The sums are the jobs' own timings (their record's times are the events').
        wait, run = "comfyautomate_job_queue_wait_seconds", "comfyautomate_job_run_seconds"
        assert _delta(before, after, wait + "_count", server="ok") == 2
        assert _delta(before, after, wait + "_count", server="bad") == 1
        assert not any(
            labels == frozenset({("server", "stuck")}) for labels in _series(after, wait + "_count")
        )
        ok_runs = [succeeded, waited]
        assert _delta(before, after, wait + "_sum", server="ok") == pytest.approx(
            sum(job["timings"]["queue_wait_s"] for job in ok_runs)
        )
        assert _delta(before, after, run + "_count", server="ok", outcome="succeeded") == 2
        assert _delta(before, after, run + "_count", server="bad", outcome="failed") == 1
        assert _delta(
            before, after, run + "_sum", server="ok", outcome="succeeded"
        ) == pytest.approx(sum(job["timings"]["run_s"] for job in ok_runs))
        assert _delta(before, after, run + "_sum", server="bad", outcome="failed") == pytest.approx(
            failed["timings"]["run_s"]
        )
        first = "comfyautomate_job_first_event_seconds_count"
        assert _delta(before, after, first, server="ok") == 2
        assert _delta(before, after, first, server="bad") == 1

        added = "comfyautomate_gateway_added_seconds_count"
        assert _delta(before, after, added, route="submit") == 2
        assert _delta(before, after, added, route="execute") == 2
        # Bucket counts are cumulative and end with every observation.
        assert (
            after[
                (
                    added.replace("_count", "_bucket"),
                    frozenset({("route", "execute"), ("le", "+Inf")}),
                )
            ]
            == after[(added, frozenset({("route", "execute")}))]
        )

        # Today's gauges stay, and no label names a job.
        assert after[("comfyautomate_server_up", frozenset({("server", "ok")}))] == 1
        assert ("comfyautomate_events_stored", frozenset()) in after
        text = (await client.get("/metrics")).text
        for job in (succeeded, failed, waited):
            assert job["job_id"] not in text
        assert held not in text

        # The log sink's lag: every event stored while it is away, exactly.
        lag = ("comfyautomate_logsink_lag_events", frozenset())
        await poll_until(lambda: _lag_is(client, 0), "the log sink caught up")
        await system.stop_log_sink()
        late = await execute(5, "ok")
        events = await sse_events(client, late["job_id"])
        assert (await _scrape(client))[lag] == len(events)


async def _has_status(client: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def _lag_is(client: httpx.AsyncClient, events: int) -> bool:
    return (await _scrape(client)).get(("comfyautomate_logsink_lag_events", frozenset())) == events
