"""What a refused request must leave as it was: the bus's job state, the streams, the files.

`footprint` reads each from the component that owns it (JetStream, the file system, the log
sink over `comfy.logs.query`), so a test can compare the whole system before and after.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError

from gateway.bus.connection import connect
from gateway.bus.contract import JobRequest, Subjects, encode
from gateway.settings import Settings
from plugins.simulator.samples import tiny_workflow


class Footprint(msgspec.Struct, frozen=True, kw_only=True):
    """Everything an accepted job would change, read at one moment."""

    job_keys: frozenset[str]
    jobs_kv_last_seq: int
    jobs_stream_last_seq: int
    events_stream_last_seq: int
    files: frozenset[tuple[str, int]]  # (path under the data folder, size)
    index_rows: tuple[int, int] | None  # rows of `events` and `jobs`, when a log sink runs


async def footprint(
    js: JetStreamContext, settings: Settings, client: httpx.AsyncClient | None = None
) -> Footprint:
    """The system's state; `client` (a gateway's) adds the log index's row counts."""
    subjects = Subjects(settings.subject_prefix)
    kv = await js.key_value(subjects.jobs_bucket)
    try:
        keys = frozenset(await kv.keys())
    except NoKeysError:
        keys = frozenset()
    # Last sequences, not message counts: JOBS is a work queue, where an acked message vanishes.
    kv_info = await js.stream_info(f"KV_{subjects.jobs_bucket}")
    jobs_info = await js.stream_info(subjects.jobs_stream)
    events_info = await js.stream_info(subjects.events_stream)
    root = Path(settings.data_dir)
    files = frozenset(
        (str(path.relative_to(root)), path.stat().st_size)
        for path in root.rglob("*")
        if path.is_file()
    )
    rows = None
    if client is not None:
        counts = await sql(
            client, "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM jobs)"
        )
        rows = (counts[0][0], counts[0][1])
    return Footprint(
        job_keys=keys,
        jobs_kv_last_seq=kv_info.state.last_seq,
        jobs_stream_last_seq=jobs_info.state.last_seq,
        events_stream_last_seq=events_info.state.last_seq,
        files=files,
        index_rows=rows,
    )


@contextlib.asynccontextmanager
async def jetstream(settings: Settings) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the system's broker, for reading its state."""
    nc = await connect(settings.nats_url, "security-test")
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def sql(client: httpx.AsyncClient, query: str) -> list[list[Any]]:
    """Rows of one SELECT on the log index, through the gateway and the log sink."""
    reply = await client.post("/logs/query", json={"sql": query})
    assert reply.status_code == 200, reply.text
    rows: list[list[Any]] = reply.json()["rows"]
    return rows


def quoted(text: str) -> str:
    """`text` as a SQL string literal (the tests' own queries, not the product's)."""
    return "'" + text.replace("'", "''") + "'"


def padded(size: int, caller: str | None = None) -> dict[str, Any]:
    """The sample workflow with a title long enough that its JobRequest is `size` bytes.

    `caller` is the one the request carries: a gateway adds its caller's (`anonymous` with no
    API keys), a request published on the bus has none.
    """
    workflow = tiny_workflow()
    workflow["1"]["_meta"] = {"title": ""}
    grow = size - len(encode(JobRequest(workflow=workflow, caller=caller)))
    assert grow >= 0, f"the sample alone is more than {size} bytes"
    workflow["1"]["_meta"]["title"] = "x" * grow
    assert len(encode(JobRequest(workflow=workflow, caller=caller))) == size
    return workflow
