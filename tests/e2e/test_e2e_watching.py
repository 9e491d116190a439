"""Watching the fleet, over one running fleet with API keys.

`GET /events`, the fleet's job state changes as Server-Sent Events: filters, a user key that
sees only its own jobs, each event told whole, resuming by `Last-Event-ID` (raw and through the
SDK, over a network that breaks) with each event once, and events the stream no longer keeps
said rather than skipped. `GET /metrics`: jobs that succeed, fail and are cancelled move the
counters and histograms by exactly what happened, and the log sink's lag counts the events it
missed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from nats.js.kv import KeyValue
from prometheus_client.parser import text_string_to_metric_families

from gateway.bus.contract import JobRecord, Subjects, decode
from gateway.bus.natsserver import start_nats_server
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK, ComfyUISDK
from tests.e2e.conftest import System, running_system, sse_events, tiny
from tests.e2e.test_e2e_resume import CuttingProxy
from tests.helpers import poll_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEYS = {"admin": "admin-key", "alice": "alice-key", "bob": "bob-key"}
STATE_CHANGES = {"queued", "dispatched", "running", "retried", "succeeded", "failed", "cancelled"}
ENDS = {"succeeded", "failed", "cancelled"}
KEEPALIVE_S = 0.3
STREAMS_PER_KEY = 8


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """Servers in pools `a` (gpu1), `b` (gpu2, whose ImageInvert fails) and `stuck` (which
    never starts a prompt); keys for an admin and two users. Every job names a pool or server."""
    base = tmp_path_factory.mktemp("fleet-events")
    async with AsyncExitStack() as stack:
        nats = await start_nats_server(
            port=0, store_dir=base / "nats", log_file=base / "nats-server.log"
        )
        stack.push_async_callback(nats.stop)
        settings = Settings(
            nats_url=nats.url,
            data_dir=str(base / "data"),
            port=0,
            api_keys=[
                f"admin@plain:{KEYS['admin']}",
                f"user/alice@plain:{KEYS['alice']}",
                f"user/bob@plain:{KEYS['bob']}",
            ],
            event_keepalive_s=KEEPALIVE_S,
            max_event_streams_per_key=STREAMS_PER_KEY,
        )
        system = await stack.enter_async_context(running_system(settings, auth("admin")))
        async with asyncio.TaskGroup() as group:
            group.create_task(system.add_server("gpu1", labels={"pool": "a"}))
            group.create_task(
                system.add_server(
                    "gpu2", SimulatorConfig(fail_nodes=["ImageInvert"]), labels={"pool": "b"}
                )
            )
            group.create_task(
                system.add_server(
                    "stuck", SimulatorConfig(hang_queue=True), labels={"pool": "stuck"}
                )
            )
        yield system


Item = tuple[str, Any]  # ("event", the event) or ("comment", its text)


async def _items(response: httpx.Response) -> AsyncIterator[Item]:
    """An SSE body's events (complete ones only, each checked against its `id:`) and comments."""
    data: list[str] = []
    event_id: int | None = None
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("id:"):
            event_id = int(line[3:])
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            event = json.loads("\n".join(data))
            assert event["id"] == event_id  # the SSE id is the event's stream sequence
            yield "event", event
            data, event_id = [], None


async def _until(items: AsyncIterator[Item], last: str, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the `kind` event of job `last`."""
    seen = []
    async with asyncio.timeout(30):
        async for what, item in items:
            if what == "event":
                seen.append(item)
                if item["job_id"] == last and item["type"] == kind:
                    return seen
    raise AssertionError(f"the stream ended before {kind} of {last}")


def _path(url: str) -> str:
    """The file a URL names, without its signature."""
    return urlsplit(url).path


def _unsigned(event: dict[str, Any]) -> dict[str, Any]:
    """A fleet event as any stream tells it: each stream signs its output URLs as it sends
    them, so two streams' copies of one event differ in their expiries only."""
    outputs = [{**o, "url": _path(o["url"])} for o in event.get("outputs") or []]
    return {**event, "outputs": outputs if event.get("outputs") is not None else None}


def _of(events: list[dict[str, Any]], job_id: str) -> list[str]:
    return [e["type"] for e in events if e["job_id"] == job_id]


def _with_progress(seed: int) -> dict[str, Any]:
    """The sample workflow, two images, also sent by SaveImageWebsocket: a progress per image."""
    workflow = tiny(seed)
    workflow["1"]["inputs"]["batch_size"] = 2
    workflow["4"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    return workflow


async def _execute(
    http: httpx.AsyncClient, key: str, workflow: dict[str, Any], pool: str
) -> dict[str, Any]:
    body = {"workflow": workflow, "labels": {"pool": pool}}
    reply = await http.post("/workflow/execute", json=body, headers=auth(key))
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


async def test_filters_a_user_key_and_whole_events(fleet: System) -> None:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as http, AsyncExitStack() as s:

        async def stream(key: str, **params: str) -> AsyncIterator[Item]:
            response = await s.enter_async_context(
                http.stream("GET", "/events", params=params, headers=auth(key))
            )
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            return _items(response)

        # All open before the jobs: a stream starts when it is answered.
        everything = await stream("admin")
        with_progress = await stream("admin", progress="true")
        alice = await stream("alice", caller="bob")  # a user's filter cannot widen its view
        of_alice = await stream("admin", caller="alice")
        pool_a = await stream("admin", label="pool=a")
        on_gpu1 = await stream("admin", server="gpu1")
        ends = await stream("admin", status="succeeded,failed")
        cancels = await stream("admin", status="cancelled")

        failed = await _execute(http, "bob", tiny(11), "b")
        done = await _execute(http, "alice", _with_progress(12), "a")
        a, b = done["job_id"], failed["job_id"]
        assert (done["status"], failed["status"]) == ("succeeded", "failed")

        all_of_them = await _until(everything, a, "succeeded")
        ids = [e["id"] for e in all_of_them]
        assert ids == sorted(set(ids))
        assert _of(all_of_them, b) == ["queued", "dispatched", "running", "failed"]
        assert _of(all_of_them, a) == ["queued", "dispatched", "running", "succeeded"]
        assert {e["job_id"] for e in all_of_them} == {a, b}

        # Each event whole: who, where, which try, and an end's outputs or error.
        by_type = {(e["job_id"], e["type"]): e for e in all_of_them}
        queued = by_type[(a, "queued")]
        assert (queued["status"], queued["caller"], queued["labels"]) == (
            "queued",
            "alice",
            {"pool": "a"},
        )
        running = by_type[(a, "running")]
        assert (running["status"], running["server_id"], running["attempt"]) == (
            "running",
            "gpu1",
            1,
        )
        end = by_type[(a, "succeeded")]
        assert (end["server_id"], end["attempt"], end["caller"], end["labels"]) == (
            "gpu1",
            1,
            "alice",
            {"pool": "a"},
        )
        assert end["error"] is None
        # The result's outputs. Each answer signs its URLs as it is given, so the stream's and
        # the result's expiries are their own: the files are the same and both URLs open.
        assert [_path(o["url"]) for o in end["outputs"]] == [_path(u) for u in done["images"]]
        for url in [o["url"] for o in end["outputs"]] + done["images"]:
            assert (await http.get(url)).status_code == 200  # no key: the signature lets it in
        assert end["seq"] == len(
            (await http.get(f"/workflow/logs/{a}", headers=auth("admin"))).json()["entries"]
        )
        broken = by_type[(b, "failed")]
        assert (broken["server_id"], broken["caller"], broken["status"]) == (
            "gpu2",
            "bob",
            "failed",
        )
        assert broken["error"]["code"] == "execution_error"
        assert broken["error"]["node_id"] == "2"
        assert broken["outputs"] == []

        progressed = await _until(with_progress, a, "succeeded")
        steps = [e for e in progressed if e["type"] == "node_progress"]
        assert steps and {(e["job_id"], e["server_id"], e["status"]) for e in steps} == {
            (a, "gpu1", "running")
        }
        assert [e["progress"]["value"] for e in steps] == sorted(
            e["progress"]["value"] for e in steps
        )
        assert [e["id"] for e in progressed if not e["type"].startswith("node_")] == ids
        # The node events: each start names its node's type, each cache hit its nodes.
        started = [e for e in progressed if e["type"] == "node_started"]
        assert started and all(e["progress"]["class_type"] for e in started)
        assert all(e["cached"] is not None for e in progressed if e["type"] == "node_cached")

        # B ended before A began: whatever passed B's events through would have shown them.
        for filtered in (alice, of_alice, pool_a):
            assert _of(await _until(filtered, a, "succeeded"), a) == _of(all_of_them, a)
        gpu1 = await _until(on_gpu1, a, "succeeded")
        assert [(e["job_id"], e["type"]) for e in gpu1] == [
            (a, "dispatched"),
            (a, "running"),
            (a, "succeeded"),
        ]
        assert [(e["job_id"], e["type"]) for e in await _until(ends, a, "succeeded")] == [
            (b, "failed"),
            (a, "succeeded"),
        ]
        # A stream nothing passes through still speaks: a keep-alive comment.
        async with asyncio.timeout(30):
            assert await anext(cancels) == ("comment", "keep-alive")


async def test_a_client_cut_mid_stream_resumes_and_sees_each_event_once(fleet: System) -> None:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as http, AsyncExitStack() as s:
        whole = _items(
            await s.enter_async_context(http.stream("GET", "/events", headers=auth("admin")))
        )
        proxy = await s.enter_async_context(CuttingProxy(fleet.url, cuts=1))
        # The broker's clock is this machine's: the job's first event is stored after this.
        since = str(time.time())
        async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as cut_http:
            cut = _items(
                await s.enter_async_context(
                    cut_http.stream("GET", "/events", headers=auth("alice"))
                )
            )
            job = (
                await http.post(
                    "/workflow/submit",
                    json={"workflow": tiny(21), "labels": {"pool": "a"}},
                    headers=auth("alice"),
                )
            ).json()["job_id"]
            before: list[dict[str, Any]] = []
            with pytest.raises(httpx.TransportError):
                async with asyncio.timeout(30):
                    async for what, item in cut:
                        if what == "event":
                            before.append(item)
        assert proxy.cut == 1 and before
        resumed = http.stream(
            "GET", "/events", headers={**auth("alice"), "Last-Event-ID": str(before[-1]["id"])}
        )
        after = await _until(_items(await s.enter_async_context(resumed)), job, "succeeded")
        reference = await _until(whole, job, "succeeded")
        assert [e["id"] for e in before + after] == [e["id"] for e in reference]
        assert _of(reference, job) == ["queued", "dispatched", "running", "succeeded"]
        from_then = http.stream("GET", "/events", params={"since": since}, headers=auth("admin"))
        then = await _until(_items(await s.enter_async_context(from_then)), job, "succeeded")
        assert [e["id"] for e in then] == [e["id"] for e in reference]

        # The SDK does the same by itself, async and sync, from an id it was given.
        start = reference[0]["id"] - 1
        async with CuttingProxy(fleet.url, cuts=1) as proxy:
            async with AsyncComfyUISDK(gateway_url=proxy.url, api_key=KEYS["alice"]) as sdk:
                seen = []
                async for event in sdk.stream_fleet_events(last_event_id=start):
                    seen.append(event)
                    if event["type"] == "succeeded":
                        break
            assert proxy.cut == 1
        async with CuttingProxy(fleet.url, cuts=1) as proxy:
            seen_sync = await asyncio.to_thread(_sdk_sync, proxy.url, start)
            assert proxy.cut == 1
        assert (
            [e["id"] for e in seen] == [e["id"] for e in seen_sync] == [e["id"] for e in reference]
        )


def _sdk_sync(url: str, start: int) -> list[dict[str, Any]]:
    with ComfyUISDK(gateway_url=url, api_key=KEYS["alice"], timeout=60) as sdk:
        events: Iterator[dict[str, Any]] = sdk.stream_fleet_events(last_event_id=start)
        seen = []
        for event in events:
            seen.append(event)
            if event["type"] == "succeeded":
                break
        return seen


async def test_refusals_and_the_stream_limit(fleet: System) -> None:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60, headers=auth("bob")) as http:
        for params, headers in (
            ({"status": "finished"}, {}),
            ({"label": "pool"}, {}),
            ({"since": "yesterday"}, {}),
            ({}, {"Last-Event-ID": "x"}),
            ({}, {"Last-Event-ID": str(10**9)}),  # past the newest event: no id of this system
        ):
            reply = await http.get("/events", params=params, headers=headers)
            assert reply.status_code == 400, (params, headers)
            assert reply.json()["code"] == "invalid_request"
        async with AsyncExitStack() as s:
            for _ in range(STREAMS_PER_KEY):
                opened = await s.enter_async_context(http.stream("GET", "/events"))
                assert opened.status_code == 200
            refused = await http.get("/events")
            assert refused.status_code == 503
            assert refused.json()["code"] == "too_many_streams"


# --------------------------------------------------------------------------------------------
# /metrics

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


async def test_jobs_move_the_counters_and_histograms_by_what_happened(fleet: System) -> None:
    """It stops the log sink: only a test that needs none follows it."""
    system = fleet
    async with httpx.AsyncClient(base_url=system.url, timeout=60, headers=auth("admin")) as client:
        before = await _scrape(client)

        async def execute(seed: int, server: str) -> dict[str, Any]:
            body = {"workflow": tiny(seed), "server": server}
            reply = await client.post("/workflow/execute", json=body)
            assert reply.status_code == 200, reply.text
            return dict(reply.json())

        succeeded = await execute(1, "gpu1")
        failed = await execute(2, "gpu2")
        submitted = await client.post(
            "/workflow/submit", json={"workflow": tiny(3), "server": "gpu1"}
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
        assert _delta(before, after, finished, outcome="succeeded", server="gpu1", reason="") == 2
        assert (
            _delta(
                before, after, finished, outcome="failed", server="gpu2", reason="execution_error"
            )
            == 1
        )
        assert _delta(before, after, finished, outcome="cancelled", server="stuck", reason="") == 1
        moved = [s for s in _series(after, finished) if _delta(before, after, finished, **dict(s))]
        assert len(moved) == 3
        retried = "comfyautomate_jobs_retried_total"
        assert not any(_delta(before, after, retried, **dict(s)) for s in _series(after, retried))

        # One wait per start and one run per end that followed a start: the held job never
        # started. The sums are the jobs' own timings (their record's times are the events').
        wait, run = "comfyautomate_job_queue_wait_seconds", "comfyautomate_job_run_seconds"
        assert _delta(before, after, wait + "_count", server="gpu1") == 2
        assert _delta(before, after, wait + "_count", server="gpu2") == 1
        assert not any(
            labels == frozenset({("server", "stuck")}) for labels in _series(after, wait + "_count")
        )
        ok_runs = [succeeded, waited]
        assert _delta(before, after, wait + "_sum", server="gpu1") == pytest.approx(
            sum(job["timings"]["queue_wait_s"] for job in ok_runs)
        )
        assert _delta(before, after, run + "_count", server="gpu1", outcome="succeeded") == 2
        assert _delta(before, after, run + "_count", server="gpu2", outcome="failed") == 1
        assert _delta(
            before, after, run + "_sum", server="gpu1", outcome="succeeded"
        ) == pytest.approx(sum(job["timings"]["run_s"] for job in ok_runs))
        assert _delta(
            before, after, run + "_sum", server="gpu2", outcome="failed"
        ) == pytest.approx(failed["timings"]["run_s"])
        first = "comfyautomate_job_first_event_seconds_count"
        assert _delta(before, after, first, server="gpu1") == 2
        assert _delta(before, after, first, server="gpu2") == 1

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
        assert after[("comfyautomate_server_up", frozenset({("server", "gpu1")}))] == 1
        assert ("comfyautomate_events_stored", frozenset()) in after
        text = (await client.get("/metrics")).text
        for job in (succeeded, failed, waited):
            assert job["job_id"] not in text
        assert held not in text

        # The log sink's lag: every event stored while it is away, exactly.
        lag = ("comfyautomate_logsink_lag_events", frozenset())
        await poll_until(lambda: _lag_is(client, 0), "the log sink caught up")
        await system.stop_log_sink()
        late = await execute(5, "gpu1")
        events = await sse_events(client, late["job_id"])
        assert (await _scrape(client))[lag] == len(events)


async def _an_ended_job_other_than(jobs: KeyValue, job_id: str) -> JobRecord:
    for key in await jobs.keys():
        entry = await jobs.get(key)
        assert entry.value is not None
        record = decode(entry.value, JobRecord)
        if key != job_id and record.status.terminal:
            return record
    raise AssertionError("no other job has ended")


async def _has_status(client: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def _lag_is(client: httpx.AsyncClient, events: int) -> bool:
    return (await _scrape(client)).get(("comfyautomate_logsink_lag_events", frozenset())) == events


async def test_events_no_longer_kept_are_said_not_skipped(fleet: System) -> None:
    """After the metrics test: the last job's events were never read by a fleet stream."""
    assert fleet.nc is not None
    js = fleet.nc.jetstream()
    stream = Subjects(fleet.settings.subject_prefix).events_stream
    last = (await js.stream_info(stream)).state.last_seq
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60, headers=auth("admin")) as http:
        # A stream that meets a job midway reads who submitted it from its first event.
        resumed = http.stream("GET", "/events", headers={"Last-Event-ID": str(last - 1)})
        async with resumed as response, asyncio.timeout(30):
            what, end = await anext(_items(response))
        assert end["id"] == last and end["type"] in ENDS
        assert end["caller"].startswith("key-") and end["server_id"] == "gpu1"

        # The stream's retention has dropped all but its last three events (the end of the
        # last job among them); a client resumes from long before.
        await js.purge_stream(stream, seq=last - 2)
        resumed = http.stream("GET", "/events", headers={"Last-Event-ID": "1"})
        async with resumed as response, asyncio.timeout(30):
            items = _items(response)
            what, missed = await anext(items)
            assert what == "event" and missed["type"] == "missed"
            assert (missed["from_id"], missed["to_id"], missed["id"]) == (2, last - 3, last - 3)
            what, again = await anext(items)
            assert what == "event" and _unsigned(again) == _unsigned(end)

        # A start at a time older than what is kept says so first, as a resume does.
        since = http.stream("GET", "/events", params={"since": "0"})
        async with since as response, asyncio.timeout(30):
            items = _items(response)
            what, missed = await anext(items)
            assert what == "event" and missed["type"] == "missed"
            assert (missed["from_id"], missed["to_id"], missed["id"]) == (1, last - 3, last - 3)
            assert "no longer kept" in missed["message"]
            what, again = await anext(items)
            assert what == "event" and _unsigned(again) == _unsigned(end)

        # A job whose events are all gone: its stream tells its end and ends (not keep-alives
        # for ever). The log sink is away since the metrics test: its record tells.
        jobs = await js.key_value(Subjects(fleet.settings.subject_prefix).jobs_bucket)
        gone = await _an_ended_job_other_than(jobs, end["job_id"])
        async with asyncio.timeout(30):
            told = await sse_events(http, gone.job_id)
        assert [(e["type"], e["seq"], e["status"]) for e in told] == [
            ("expired", gone.last_seq, gone.status.value)
        ]
        assert "no longer keeps the events" in told[0]["message"]
        async with AsyncComfyUISDK(fleet.url, api_key=KEYS["admin"]) as sdk:
            assert [e async for e in sdk.stream_events(gone.job_id)] == told
