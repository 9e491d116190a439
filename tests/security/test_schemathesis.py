"""The gateway's OpenAPI document holds: schemathesis against a running system, over HTTP.

Every operation the document lists gets a fixed number of generated requests, valid and
invalid, from a derandomized generator (the same requests on every run). A 5xx answer, or an
answer whose body does not match what the document promises for its status, is a failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import hypothesis
import msgspec
import pytest
import schemathesis
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.settings import Settings
from tests.e2e.conftest import running_system

EXAMPLES = 4  # per operation and per mode (valid, invalid)
KEYED_EXAMPLES = 3  # with keys: the same shapes again, now answered by the key checks first
CHECKS = [checks.not_a_server_error, response_schema_conformance]


def _fuzz(
    url: str, headers: dict[str, str] | None = None, examples: int = EXAMPLES
) -> tuple[list[str], int]:
    """Run every operation with `headers`; the failures, and how many operations ran."""
    # ComfyUI's own routes answer in ComfyUI's shapes and have a fuzz suite of their own
    # (test_native_fuzz.py); this one holds the REST API to its document.
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json").exclude(tag="comfyui")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        if operation.path == "/events":
            continue  # a stream that never ends by design (tests/e2e/test_e2e_watching.py)
        modes = [GenerationMode.POSITIVE]
        # Only a body or a query string can be invalid: any text is a valid path segment, and
        # searching for an invalid one costs seconds before it gives up.
        if len(operation.query) or len(operation.body):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.settings(
                max_examples=examples,
                derandomize=True,
                database=None,  # nothing written to the working tree
                deadline=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                case.call_and_validate(base_url=url, checks=CHECKS, timeout=30, headers=headers)

            try:
                run()
            except Unsatisfiable:
                continue  # no invalid form of this operation's parameters exists
            except (AssertionError, FailureGroup) as exc:
                failures.append(f"{operation.label} ({mode}): {exc}")
    return failures, operations


# schemathesis draws from the global `random` module inside its strategies; hypothesis notices
# only when the draw moves that module's state, so the warning came in some runs and not others.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
@pytest.mark.parametrize("key", [None, "admin", "user"])
async def test_the_openapi_document_holds_against_the_running_gateway(
    settings: Settings, key: str | None
) -> None:
    # Registration probes the address it is given: only loopback may be probed.
    settings = msgspec.structs.replace(settings, server_allowlist=["127.0.0.1/32"])
    headers = None
    if key is not None:
        # With keys, as an admin (every route open to it) and as a user (fleet routes 403,
        # others' jobs 404): either way each answer must be one the document promises.
        keys = {"admin": "admin-key-91c2", "user": "user-key-3f0d"}
        settings = msgspec.structs.replace(
            settings, api_keys=["admin@plain:" + keys["admin"], "user/u@plain:" + keys["user"]]
        )
        headers = {"Authorization": f"Bearer {keys[key]}"}
    admin = {"Authorization": "Bearer admin-key-91c2"} if key is not None else None
    async with running_system(settings, headers=admin) as system:
        await system.add_server("gpu1")
        # schemathesis sends blocking requests: from a thread, while the gateway runs here.
        examples = EXAMPLES if key is None else KEYED_EXAMPLES
        failures, operations = await asyncio.to_thread(_fuzz, system.url, headers, examples)
        async with httpx.AsyncClient(base_url=system.url, headers=admin) as client:
            assert (await client.get("/health")).status_code == 200
    assert operations >= 15
    assert not failures, "\n\n".join(failures)
