"""Bad input on the bus: every request subject answers with an error and changes nothing.

The same catalogue as over REST, published as raw bytes on `comfy.submit`, plus the other
request subjects (`comfy.control.<server>`, `comfy.logs.query`, `comfy.logs.job`) and a
client that ignores the broker's message size.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from nats.errors import MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.balancer.requestchecks import MAX_REQUEST_BYTES
from gateway.bus.connection import connect
from gateway.bus.contract import (
    SCHEMA_VERSION,
    ContractError,
    ControlReply,
    Error,
    JobRequest,
    Subjects,
    decode,
    encode,
)
from gateway.logsink.messages import job_log_subject
from gateway.settings import Settings
from tests.conftest import running_gateway
from tests.e2e.conftest import running_system, tiny
from tests.security.conftest import footprint, jetstream, padded
from tests.security.test_rest_inputs import catalogue, nest

# A JobRequest ignores fields it does not know (a later minor version may add some), where the
# REST body refuses them.
# REST refuses these before reading the workflow: a field the bus message does not have, a body
# nested deeper than REST's JSON guard (on the bus, the workflow's own depth check refuses the
# same input: the 80-level case).
_FIELD_ONLY_ON_REST = {"unknown field", "an input nested 700 levels"}


async def test_bad_requests_on_every_request_subject_get_errors_and_change_nothing(
    settings: Settings,
) -> None:
    subjects = Subjects(settings.subject_prefix)
    async with running_system(settings) as system:
        await system.add_server("gpu1")
        nc = await connect(settings.nats_url, "bad-client")
        try:
            async with (
                jetstream(settings) as js,
                httpx.AsyncClient(base_url=system.url, timeout=30) as client,
            ):
                before = await footprint(js, settings, client)
                wrong = []

                async def ask(subject: str, payload: bytes) -> bytes:
                    try:
                        reply = await nc.request(subject, payload, timeout=5)
                    except NatsTimeoutError:
                        wrong.append(f"{subject}: no answer to {payload[:60]!r}")
                        return encode(Error(code="no_answer", message=""))
                    return bytes(reply.data)

                # comfy.submit: the REST catalogue, as the bytes of a JobRequest.
                for case in catalogue():
                    if case.name in _FIELD_ONLY_ON_REST:
                        continue
                    answer = await ask(subjects.submit, _as_job_request(case.body))
                    try:
                        error = decode(answer, Error)
                    except ContractError:
                        wrong.append(f"{case.name}: no Error but {answer[:300]!r}")
                        continue
                    if error.code != case.code or case.says not in error.message:
                        wrong.append(f"{case.name}: {error.code} {error.message}")

                # An override nested too deeply (REST refuses it earlier, as a value no input
                # takes): the bus's own check refuses it too.
                deep = {"workflow": tiny(), "overrides": {"2.x": nest(80)}}
                error = decode(await ask(subjects.submit, json.dumps(deep).encode()), Error)
                assert error.code == "invalid_overrides" and "64 levels" in error.message, error

                # A later schema version, and a request of one byte over the limit.
                later = json.dumps({"v": SCHEMA_VERSION + 1, "workflow": tiny()}).encode()
                error = decode(await ask(subjects.submit, later), Error)
                assert error.code == "invalid_request"
                assert f"schema version {SCHEMA_VERSION + 1}" in error.message
                error = decode(
                    await ask(
                        subjects.submit, encode(JobRequest(workflow=padded(MAX_REQUEST_BYTES + 1)))
                    ),
                    Error,
                )
                assert error.code == "too_large", error
                assert error.details["max_request_bytes"] == MAX_REQUEST_BYTES

                # The adapter's control subject.
                control = subjects.control("gpu1")
                for payload in (
                    b"{not json",
                    b'{"op": "cancel", "job_id": "\xff"}',
                    b'{"op": "cancel", "job_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                    b'{"op": "reboot"}',
                    b'{"op": "cancel"}',
                    json.dumps({"op": "cancel", "job_id": 5}).encode(),
                    json.dumps({"op": "cancel", "job_id": "x", "v": 99}).encode(),
                    json.dumps({"op": "cancel", "job_id": "../../etc/passwd"}).encode(),
                ):
                    answer = await ask(control, payload)
                    if b"no_answer" in answer:
                        continue
                    reply = decode(answer, ControlReply)
                    if reply.ok:
                        wrong.append(f"control {payload!r} was accepted")

                # The log sink's subjects.
                for subject, payload, code in (
                    (subjects.logs_query, b"{not json", "invalid_request"),
                    (subjects.logs_query, b'{"sql": "SELECT \xff"}', "invalid_request"),
                    (subjects.logs_query, b'{"sql": 5}', "invalid_request"),
                    (subjects.logs_query, b'{"sql": "SELECT 1", "v": 99}', "invalid_request"),
                    (subjects.logs_query, b'{"sql": "DROP TABLE jobs"}', "not_select"),
                    (
                        subjects.logs_query,
                        b'{"sql": "SELECT 1", "max_rows": -1}',
                        "invalid_request",
                    ),
                    (job_log_subject(subjects), b"[]", "invalid_request"),
                    (job_log_subject(subjects), b'{"job_id": "x", "v": 99}', "invalid_request"),
                    (job_log_subject(subjects), b'{"job_id": "../../etc/passwd"}', "not_found"),
                    (job_log_subject(subjects), b'{"job_id": "x", "offset": -1}', "not_found"),
                ):
                    error = decode(await ask(subject, payload), Error)
                    if error.code not in (code, "no_answer"):
                        wrong.append(f"{subject} {payload!r}: {error.code} {error.message}")
                assert not wrong, "\n".join(wrong)
                # The tables are all still there, and nothing anywhere changed.
                assert await footprint(js, settings, client) == before
        finally:
            await nc.close()


def _as_job_request(body: bytes) -> bytes:
    """A REST submission body as the JobRequest a bus client would send (`timeout` renamed)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(value, dict) and "timeout" in value:
        value["timeout_s"] = value.pop("timeout")
    return json.dumps(value).encode()


async def test_a_message_over_the_brokers_limit_is_never_delivered(settings: Settings) -> None:
    """10 MB and 100 MB requests: nats-py refuses to send them, and the broker cuts off a
    client that tries anyway, before any balancer sees a byte."""
    subjects = Subjects(settings.subject_prefix)
    async with running_gateway(settings) as url:
        nc = await connect(settings.nats_url, "big-client")
        try:
            for size in (10 * 1024 * 1024, 100 * 1024 * 1024):
                with pytest.raises(MaxPayloadError):
                    await nc.request(subjects.submit, b" " * size, timeout=5)
        finally:
            await nc.close()
        host, port = settings.nats_url.removeprefix("nats://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            info = await reader.readline()
            assert info.startswith(b"INFO ")
            max_payload = json.loads(info[5:])["max_payload"]
            assert max_payload <= 8 * 1024 * 1024
            writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
            writer.write(f"PUB {subjects.submit} {100 * 1024 * 1024}\r\n".encode())
            await writer.drain()
            answer = await reader.readline()
            assert b"Maximum Payload" in answer, answer
            assert await reader.read() == b""  # the broker closed the connection
        finally:
            writer.close()
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).json()["nats"] is True
