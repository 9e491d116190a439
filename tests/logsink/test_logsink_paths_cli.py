"""Log file names, and the CLI commands against a running sink."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from gateway.app import render
from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.bus.natsserver import NatsServer
from gateway.logsink import LogSink, log_file_path, log_file_relpath, paths
from gateway.logsink.cli import add_parsers
from tests.logsink.jobs import run_job

T0 = 1_750_000_000.0


def test_log_file_names() -> None:
    assert log_file_relpath("abc123", T0) == "logs/prompts/20250615_150640_abc123.jsonl"
    data = Path("/srv/data")
    expected = Path("/srv/data/logs/prompts/20250615_150640_abc123.jsonl")
    assert log_file_path(data, "abc123", T0) == expected
    assert log_file_path(data / "logs", "abc123", T0) == expected
    assert log_file_path(str(data), "abc123", T0 + 0.999) == expected
    # An id that would leave the folder is kept inside it, and read back.
    odd = log_file_path(data, "a/b\\c%d", T0)
    assert odd.parent == data / "logs" / "prompts"
    assert paths.job_id_of(odd.name) == "a/b\\c%d"
    assert paths.job_id_of("notes.txt") is None
    assert paths.job_id_of("2025_x_abc.jsonl") is None


def test_find_log_file(tmp_path: Path) -> None:
    target = log_file_path(tmp_path, "j1", T0)
    target.parent.mkdir(parents=True)
    target.write_text("")
    log_file_path(tmp_path, "xj1", T0).write_text("")
    assert paths.find_log_file(tmp_path, "j1") == target
    assert paths.find_log_file(tmp_path, "j2") is None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def test_cli_rebuild_waits_for_the_sink_to_stop(
    nats_server: NatsServer,
    nc: Client,
    subjects: Subjects,
    data_dir: Path,
    sink: LogSink,
    publisher: EventPublisher,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    events = await run_job(publisher, "cli-job", submitted_at=T0, fail=True)
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    common = ["--nats-url", nats_server.url, "--data-dir", str(data_dir)]

    # With the sink running, a rebuild is refused; once stopped, it works.
    rebuild = _parse(["logs", "rebuild", *common])
    assert await asyncio.to_thread(rebuild.handler, rebuild) == 1
    await sink.close()
    assert await asyncio.to_thread(rebuild.handler, rebuild) == 0
    assert f"{len(events)} events from 1 files" in capsys.readouterr().out


async def test_a_failed_jobs_timeline_shows_its_traceback(
    publisher: EventPublisher, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    events = await run_job(publisher, "cli-failed", submitted_at=T0, fail=True)
    render.timeline("cli-failed", "the/log.jsonl", [msgspec.to_builtins(e) for e in events])
    out = capsys.readouterr().out
    assert "job cli-failed" in out and "CUDA out of memory" in out and "OutOfMemoryError" in out
    assert f"{len(events)} events" in out
