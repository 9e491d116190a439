"""Every code block a reader would paste from README.md and docs/ runs against a real system,
so the docs cannot drift from the code. How a block is run: tests/docs/docblocks.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.settings import Settings
from sdk import AsyncComfyUISDK, ComfyUISDK
from tests.docs.docblocks import DOCUMENTS, ROOT, RUN_LANGUAGES, Block, blocks, commands, substitute
from tests.e2e.conftest import running_system
from tests.e2e.receiver import Received, receiving
from tests.helpers import poll_until

BLOCK_TIMEOUT_S = 90


def test_every_block_is_run_or_says_why_not() -> None:
    """A language the runner does not know, or a directive on a block it would not run anyway,
    is a mistake in the docs."""
    for document in DOCUMENTS:
        for block in blocks(document):
            assert block.language in RUN_LANGUAGES | {"", "text", "nginx", "sh"} or block.not_run, (
                f"{block.where}: a ```{block.language} block: add it to the runner or say why not"
            )
            if block.not_run:
                assert block.language in RUN_LANGUAGES, f"{block.where}: shown only anyway"


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"docs" * 8).decode()


@pytest.mark.timeout(600)
async def test_the_docs_code_runs_against_the_system(settings: Settings, tmp_path: Path) -> None:
    assert shutil.which("curl"), "the docs' examples use curl"
    # The docs' webhooks go to a receiver here, never out of this machine.
    settings = msgspec.structs.replace(
        settings, webhook_secret=WEBHOOK_SECRET, webhook_allowlist=["127.0.0.1"]
    )
    failures: list[str] = []
    async with receiving() as receiver, running_system(settings) as system:
        comfyui = await system.add_server("docs-gpu")
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            tiny = json.loads((ROOT / "workflows/model_free/tiny.json").read_text())
            body = {"workflow": tiny, "webhook_url": receiver.url}
            reply = await client.post("/workflow/execute", json=body)
            assert reply.status_code == 200, reply.text
            job_id = reply.json()["job_id"]
            await receiver.wait_for(lambda got: len(got) > 0)
            delivery = receiver.requests[0]
            await poll_until(lambda: _logged(client, delivery.delivery_id), "attempt indexed")
            gateway = system.url.removeprefix("http://")
            places = {
                "http://localhost:8000": system.url,
                "http://127.0.0.1:8000": system.url,
                "localhost:8000": gateway,
                "127.0.0.1:8000": gateway,
                "nats://127.0.0.1:4222": settings.nats_url,
                # A second registration of the docs' ComfyUI under another name: the same fake.
                "127.0.0.1:8188": comfyui.address,
                "https://example.com/hook": receiver.url,
                "JOB_ID": job_id,
                "DELIVERY_ID": delivery.delivery_id,
            }
            for document in DOCUMENTS:
                for block in blocks(document):
                    if block.not_run or block.language not in RUN_LANGUAGES:
                        continue
                    why = await _run(block, places, client, settings, tmp_path)
                    if why:
                        failures.append(f"{block.where} ({block.language}): {why}")
                    if block.language == "python" and "def verify(" in block.text:
                        why = _verifies(block, delivery)
                        if why:
                            failures.append(f"{block.where} (webhook check): {why}")
    assert not failures, "\n\n".join(failures)


async def _logged(client: httpx.AsyncClient, delivery_id: str) -> bool:
    sql = f"SELECT count(*) FROM webhook_deliveries WHERE delivery_id = '{delivery_id}'"
    reply = await client.post("/logs/query", json={"sql": sql})
    return reply.status_code == 200 and reply.json()["rows"] == [[1]]


def _verifies(block: Block, delivery: Received) -> str | None:
    """The docs' signature check, on a request the gateway really sent: it must accept it, and
    refuse it with another body or secret."""
    space: dict[str, Any] = {}
    exec(compile(block.text, block.where, "exec"), space)
    verify = space["verify"]
    headers = dict(delivery.headers)
    if not verify(WEBHOOK_SECRET, headers, delivery.body):
        return "refuses a request the gateway signed"
    if verify(WEBHOOK_SECRET, headers, delivery.body + b" "):
        return "accepts a changed body"
    other = "whsec_" + base64.b64encode(b"else" * 8).decode()
    if verify(other, headers, delivery.body):
        return "accepts another secret"
    return None


async def _run(
    block: Block,
    places: dict[str, str],
    client: httpx.AsyncClient,
    settings: Settings,
    tmp_path: Path,
) -> str | None:
    """Run one block; None if it did what it shows, else why not."""
    text = substitute(block.text, places)
    if block.language == "json":
        try:
            json.loads(text)
        except ValueError as exc:
            return f"not JSON: {exc}"
        return None
    if block.language == "toml":
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            return f"not TOML: {exc}"
        return None
    if block.language == "promql":
        exposed = (await client.get("/metrics")).text
        for name in set(re.findall(r"\bcomfyautomate_[a-z0-9_]+", text)):
            if not re.search(rf"^{name}[{{ ]", exposed, re.M):
                return f"/metrics has no {name}"
        return None
    if block.language == "sql":
        # A block may show several statements, each ending its line with `;`.
        for statement in filter(None, (s.strip() for s in re.split(r";\s*\n", text))):
            reply = await client.post("/logs/query", json={"sql": statement})
            if reply.status_code != 200:
                return f"{reply.status_code} {reply.text}"
        return None
    if block.language == "python":
        return await _process([sys.executable, "-c", text], settings, tmp_path)
    for command in commands(text):
        # A reader's shell finds the gateway at the documented address; ours is elsewhere.
        gateway = places["http://127.0.0.1:8000"]
        why = await _process(
            ["bash", "-c", _shell(command)],
            settings,
            tmp_path,
            COMFYAUTOMATE_GATEWAY_URL=gateway,
        )
        if why:
            return f"`{command}`: {why}"
    return None


def _shell(command: str) -> str:
    """A documented command as this checkout runs it: our CLI and Python from this venv, curl
    failing on an error answer."""
    python = sys.executable
    for written in ("uv run comfyautomate", "comfyautomate"):
        if command.startswith(written + " "):
            command = f"{python} -m gateway.app.cli" + command[len(written) :]
    command = command.replace("uv run python ", f"{python} ")
    if command.startswith("curl -N "):
        # A live stream: it must answer and stream; one that never ends is cut after a while
        # (the fleet's stream, which the whole wait is spent on).
        cut = "rc=$?; [ $rc = 28 ] && rc=0; exit $rc"
        return f"curl -sS --fail-with-body --max-time 2 {command[5:]}; {cut}"
    return command.replace("curl ", "curl -sS --fail-with-body --max-time 60 ")


async def _process(argv: list[str], settings: Settings, tmp_path: Path, **extra: str) -> str | None:
    env = {**os.environ, "COMFYAUTOMATE_DATA_DIR": settings.data_dir, **extra}
    env.pop("COMFYAUTOMATE_API_KEY", None)
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: whatever it starts is stopped with it
    )
    try:
        async with asyncio.timeout(BLOCK_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        return f"still running after {BLOCK_TIMEOUT_S} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group: a block's children too
        if process.returncode is None:
            await process.wait()
    if process.returncode != 0:
        said = (err or out).decode(errors="replace").strip().splitlines()[-8:]
        return f"exit {process.returncode}: " + "\n".join(said)
    return None


def _readme_table(heading: str) -> list[str]:
    """The first cells of the first table after `heading` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = text[text.index(heading) :].split("\n|---", 1)[1].split("\n\n", 1)[0].splitlines()
    return [row.split("|")[1] for row in rows if row.startswith("| ")]


def test_the_configuration_table_names_every_setting() -> None:
    named = {name for cell in _readme_table("## Configuration") for name in _ticked(cell)}
    assert named == set(Settings.__struct_fields__)


def test_the_sdk_table_shows_each_method_as_it_is() -> None:
    shown = [
        call
        for cell in _readme_table("## Quick start (Python)")
        for call in re.findall(r"`([a-z_]+\([^`]*\))`", cell)
    ]
    assert len(shown) >= 10
    for call in shown:
        name, params = call.split("(", 1)
        written = {p.strip().lstrip("*").split("=")[0] for p in params[:-1].split(",")} - {"", "*"}
        for client in (ComfyUISDK, AsyncComfyUISDK):
            actual = set(inspect.signature(getattr(client, name)).parameters) - {"self"}
            assert written == actual, f"README shows {call}; {client.__name__} has {actual}"


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([a-z_0-9]+)`", cell)
