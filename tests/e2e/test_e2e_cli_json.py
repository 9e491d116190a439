"""Every client command with --json, its exit codes, and what people see, against the running
shared. The commands run in this process (as `comfyautomate` would run them) to keep it quick;
tests/e2e/test_e2e_cli.py runs the real executable. One system for the module, with gpu1; a
server a test adds it removes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.app.cli import build_parser
from plugins.simulator import SimulatorConfig, run_simulator
from tests.e2e.conftest import System, system_of_its_own, tiny
from tests.helpers import poll_until


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("cli-json")) as running:
        await running.add_server("gpu1")
        yield running


async def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    code: int = await asyncio.to_thread(args.handler, args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines()]


async def test_every_client_command_answers_json_and_its_exit_code(
    shared: System, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--gateway", shared.url, "--json")
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(41)))

    await _drain_and_undrain(shared, capsys, at)

    async with run_simulator(SimulatorConfig(base_dir=str(tmp_path / "sim"))) as other:
        code, out, _ = await _run(capsys, "servers", "add", "gpu1b", other.address, *at)
    assert code == 0 and _lines(out)[0]["server_id"].startswith("gpu1b")
    code, out, _ = await _run(capsys, "servers", "list", *at)
    added = next(s["server_id"] for s in _lines(out)[0] if s["server_id"] != "gpu1")
    assert code == 0 and len(_lines(out)[0]) == 2
    # A job pinned to that server, whose ComfyUI is gone, waits: until it is cancelled.
    code, out, _ = await _run(capsys, "submit", str(workflow), "--server", added, *at)
    assert code == 0 and set(_lines(out)[0]) == {"job_id"}
    waiting = _lines(out)[0]["job_id"]
    code, out, _ = await _run(capsys, "jobs", "cancel", waiting, *at)
    assert code == 0 and _lines(out)[0]["status"] == "cancelled"
    code, out, _ = await _run(capsys, "jobs", "cancel", waiting, *at)
    assert code == 1 and _lines(out)[0]["error"]["code"] == "already_finished"
    for _ in range(2):  # removing is idempotent
        code, out, _ = await _run(capsys, "servers", "remove", added, *at)
        assert (code, _lines(out)) == (0, [{"removed": added}])

    # submit --wait --json: every event as a line, in order, then the result.
    code, out, _ = await _run(
        capsys, "submit", str(workflow), "--wait", "--out", str(tmp_path / "out"), *at
    )
    lines = _lines(out)
    *events, result = lines
    assert code == 0 and result["status"] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "queued" and events[-1]["type"] == "succeeded"
    assert [Path(p).is_file() for p in result["downloaded"]] == [True]
    job_id = result["job_id"]

    code, out, _ = await _run(capsys, "jobs", "show", job_id, *at)
    keys = [o["key"] for o in _lines(out)[0]["outputs"]]
    assert code == 0 and keys == [o["key"] for o in result["outputs"]]  # URLs: signed anew
    code, out, _ = await _run(capsys, "jobs", "list", *at)
    assert code == 0 and job_id in {job["job_id"] for job in _lines(out)[0]}
    code, out, _ = await _run(capsys, "jobs", "show", "no-such-job", *at)
    assert code == 1 and _lines(out)[0]["error"]["code"] == "unknown_job"

    code, out, _ = await _run(capsys, "logs", "show", job_id, *at)
    log = _lines(out)[0]
    assert code == 0 and [e["seq"] for e in log["entries"]] == [e["seq"] for e in events]
    query = f"SELECT status FROM jobs WHERE job_id = '{job_id}'"
    code, out, _ = await _run(capsys, "logs", "sql", query, *at)
    assert code == 0 and _lines(out)[0]["rows"] == [["succeeded"]]
    code, out, _ = await _run(capsys, "logs", "sql", "DROP TABLE jobs", *at)
    assert code == 1 and _lines(out)[0]["error"]["code"] == "not_select"


async def _drain_and_undrain(
    system: System, capsys: pytest.CaptureFixture[str], at: tuple[str, ...]
) -> None:
    """`servers drain` while gpu1 runs a job: --wait returns once the job is done there."""
    gpu1 = system.sims["gpu1"]
    gpu1.hold_setup(True)  # the job runs until released
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        reply = await client.post("/workflow/submit", json={"workflow": tiny(40), "server": "gpu1"})
        job_id = reply.json()["job_id"]
        await poll_until(lambda: _running(client, job_id), "the job running on gpu1")
        code, out, _ = await _run(
            capsys, "servers", "drain", "gpu1", "--wait", "--timeout", "0.1", *at
        )
        assert (code, _lines(out)[0]["error"]["code"]) == (1, "timeout")
        waiting = asyncio.create_task(_run(capsys, "servers", "drain", "gpu1", "--wait", *at))
        gpu1.hold_setup(False)
        code, out, _ = await waiting
        assert code == 0, out
        drained = _lines(out)[0]
        assert (drained["draining"], drained["jobs_held"]) == (True, 0), drained
        result = (await client.get(f"/workflow/result/{job_id}", params={"wait": 30})).json()
        assert result["status"] == "succeeded"
    code, out, _ = await _run(capsys, "servers", "list", "--gateway", system.url)
    assert code == 0 and "drained" in out, out
    code, out, _ = await _run(capsys, "servers", "undrain", "gpu1", "--gateway", system.url)
    assert (code, out) == (0, "gpu1: in service, takes jobs\n")


async def _running(client: httpx.AsyncClient, job_id: str) -> bool:
    reply = await client.get(f"/workflow/status/{job_id}")
    return bool(reply.json()["status"] == "running")


async def test_user_errors_are_one_line_and_an_exit_code(
    shared: System, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--gateway", shared.url)
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    cases = [
        (2, ("submit", str(tmp_path / "missing.json"), *at)),
        (2, ("submit", str(not_json), *at)),
        (2, ("submit", str(not_json), "--set", "no-equals-sign", *at)),
        (1, ("jobs", "show", "no-such-job", *at)),
        (3, ("jobs", "list", "--gateway", "http://127.0.0.1:9")),
    ]
    for expected, argv in cases:
        code, out, err = await _run(capsys, *argv)
        assert code == expected, (argv, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("comfyautomate: "), err


async def test_a_person_sees_every_node_end_and_whole_job_ids(
    shared: System,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(42)))
    code, out, err = await _run(capsys, "submit", str(workflow), "--wait", "--gateway", shared.url)
    assert code == 0, err
    job_id = out.split("/images/")[1].split("/")[0]
    rows = [line for line in err.splitlines() if line.startswith("node ")]
    # The live view's last frame: every node of the workflow, each ended (none left running).
    assert sorted(row.split()[1] for row in rows) == sorted(tiny(42)), err
    assert all(" done " in row for row in rows), err
    assert {row.split()[2] for row in rows} == {node["class_type"] for node in tiny(42).values()}
    assert f"job {job_id}: succeeded on gpu1" in err

    code, out, _ = await _run(capsys, "jobs", "list", "--gateway", shared.url)
    assert code == 0 and job_id in out

    # No gateway, but the log file at hand: `logs show --data-dir` reads it.
    code, out, err = await _run(
        capsys, "logs", "show", job_id, "--data-dir", shared.settings.data_dir,
        "--gateway", "http://127.0.0.1:9",
    )  # fmt: skip
    assert code == 0, err
    assert f"job {job_id}" in out and "succeeded" in out
