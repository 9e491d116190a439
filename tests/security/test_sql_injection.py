"""SQL in every text that reaches the log index is stored as text, never run.

Jobs go through the whole system (REST, balancer, adapter, fake ComfyUI, log sink) carrying
SQL, quotes, unicode and control characters in their metadata, node ids, titles, class types,
input values and the error messages those produce. Then the index is asked: every table and
view is still there, and each string is stored exactly as it was sent.
"""

from __future__ import annotations

from typing import Any

import httpx

from gateway.settings import Settings
from tests.e2e.conftest import running_system
from tests.helpers import poll_until
from tests.security.conftest import quoted, sql

EVIL = [
    "'); DROP TABLE jobs; --",
    '" OR 1=1; DROP TABLE events; --',
    "'; ATTACH '/tmp/evil.duckdb' AS evil; --",
    "x' UNION SELECT sql FROM duckdb_tables() --",
    "'; COPY events TO '/tmp/evil.csv'; --",
    "$.\"a\".b[0] ->> '$' ? %s {0} $1",
    "ö ü 漢字 🎨 \u202eevil",
    "tab\there\r\nnew\x1b[31mline\x01\x7f nul\x00",
    "back\\slash \\' \\\" \\\\",
]
TABLES = ("events", "jobs")
VIEWS = ("node_runs", "slowest_nodes", "failure_rates", "daily_timing")
TERMINAL = ("succeeded", "failed", "cancelled")


def chain(ids: list[str]) -> dict[str, Any]:
    """EmptyImage -> ImageInvert ... -> SaveImage, with these node ids, titled by their ids."""
    workflow: dict[str, Any] = {}
    for index, node_id in enumerate(ids):
        if index == 0:
            node: dict[str, Any] = {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            }
        elif index == len(ids) - 1:
            node = {
                "class_type": "SaveImage",
                "inputs": {"images": [ids[index - 1], 0], "filename_prefix": "sqli"},
            }
        else:
            node = {"class_type": "ImageInvert", "inputs": {"image": [ids[index - 1], 0]}}
        node["_meta"] = {"title": node_id}
        workflow[node_id] = node
    return workflow


async def test_sql_in_every_text_field_is_stored_verbatim(settings: Settings) -> None:
    metadata = {f"k{i} {evil}": evil for i, evil in enumerate(EVIL)}
    async with (
        running_system(settings) as system,
        httpx.AsyncClient(base_url=system.url, timeout=60) as client,
    ):
        # No server is known yet, so a job naming unknown node classes is taken (and
        # cancelled): its class types reach the index through its `queued` event.
        classes = {str(i): {"class_type": evil, "inputs": {}} for i, evil in enumerate(EVIL)}
        held = await client.post(
            "/workflow/submit", json={"workflow": classes, "job_id": "sqli-classes"}
        )
        assert held.status_code == 202, held.text
        assert (await client.post("/workflow/cancel/sqli-classes")).status_code == 200

        await system.add_server("gpu1")
        ran = await client.post(
            "/workflow/execute",
            json={
                "workflow": chain(EVIL),
                "metadata": metadata,
                "job_id": "sqli--DROP-TABLE-jobs=1",
            },
        )
        assert ran.status_code == 200, ran.text
        assert ran.json()["status"] == "succeeded", ran.text
        # ComfyUI refuses a missing image file and quotes the name: the error message.
        load = {
            "1": {"class_type": "LoadImage", "inputs": {"image": EVIL[0]}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        }
        failed = await client.post(
            "/workflow/execute", json={"workflow": load, "job_id": "sqli-message"}
        )
        assert failed.json()["status"] == "failed", failed.text
        assert EVIL[0] in failed.json()["error"]["message"]

        async def indexed() -> bool:
            states = ", ".join(quoted(s) for s in TERMINAL)
            rows = await sql(client, f"SELECT count(*) FROM jobs WHERE status IN ({states})")
            return bool(rows[0][0] == 3)

        await poll_until(indexed, "the three jobs indexed as finished")

        # Every table and view is there and answers.
        names = {row[0] for row in await sql(client, "SELECT table_name FROM duckdb_tables()")}
        assert set(TABLES) <= names
        views = {row[0] for row in await sql(client, "SELECT view_name FROM duckdb_views()")}
        assert set(VIEWS) <= views
        for name in (*TABLES, *VIEWS):
            await sql(client, f"SELECT count(*) FROM {name}")

        # Class types, from the queued event's copy of the workflow.
        rows = await sql(
            client,
            "SELECT data->'request'->'workflow' FROM events "
            "WHERE job_id = 'sqli-classes' AND type = 'queued'",
        )
        assert rows[0][0] == classes

        job = "sqli--DROP-TABLE-jobs=1"
        rows = await sql(
            client,
            "SELECT data->'request'->'metadata', data->'request'->'workflow' FROM events "
            f"WHERE job_id = {quoted(job)} AND type = 'queued'",
        )
        assert rows[0][0] == metadata
        assert rows[0][1] == chain(EVIL)
        # Node ids, as columns of their own.
        rows = await sql(
            client,
            f"SELECT DISTINCT node_id FROM events WHERE job_id = {quoted(job)} "
            "AND type = 'node_started'",
        )
        assert {row[0] for row in rows} == set(EVIL)
        rows = await sql(
            client, f"SELECT node_id, class_type FROM node_runs WHERE job_id = {quoted(job)}"
        )
        assert {row[0]: row[1] for row in rows} == {
            node_id: node["class_type"] for node_id, node in chain(EVIL).items()
        }

        # The error message, in the jobs table.
        rows = await sql(client, "SELECT error_message FROM jobs WHERE job_id = 'sqli-message'")
        assert EVIL[0] in rows[0][0]

        # The job's JSONL log holds the same strings.
        log = (await client.get(f"/workflow/logs/{job}")).json()
        queued = next(e for e in log["entries"] if e["type"] == "queued")
        assert queued["data"]["request"]["metadata"] == metadata
        assert queued["data"]["request"]["workflow"] == chain(EVIL)


async def test_sql_that_would_change_the_index_or_swamp_the_bus_is_refused(
    settings: Settings,
) -> None:
    async with (
        running_system(settings) as system,
        httpx.AsyncClient(base_url=system.url, timeout=60) as client,
    ):
        await system.add_server("gpu1")
        ran = await client.post("/workflow/execute", json={"workflow": chain(["a", "b"])})
        assert ran.json()["status"] == "succeeded", ran.text

        async def indexed() -> bool:
            rows = await sql(client, "SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            return bool(rows[0][0] == 1)

        await poll_until(indexed, "the job indexed as finished")
        before = await sql(client, "SELECT job_id, status FROM jobs")
        for statement in (
            "WITH x AS (UPDATE jobs SET status='pwned' RETURNING *) SELECT * FROM x",
            "SELECT * FROM (WITH x AS (DELETE FROM events RETURNING 1) SELECT * FROM x)",
            "SELECT * FROM query('SELECT 1')",
        ):
            reply = await client.post("/logs/query", json={"sql": statement})
            assert reply.status_code == 400, (statement, reply.text)
            assert reply.json()["code"] in ("not_select", "forbidden"), reply.text
        assert await sql(client, "SELECT job_id, status FROM jobs") == before

        # Bigger than a bus message: refused by the gateway, before it is sent.
        huge = await client.post("/logs/query", json={"sql": "SELECT 1 -- " + "x" * 9_000_000})
        assert huge.status_code == 413, huge.text
        assert huge.json()["code"] == "too_large"
        assert huge.json()["details"] == {"max_sql_bytes": 64 * 1024}
        assert await sql(client, "SELECT 1") == [[1]]
