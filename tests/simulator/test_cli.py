"""The simulator as a process: `python -m plugins.simulator --port 0`, and its real PNGs."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "tests" / "data" / "comfyui-protocol" / "workflows"


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and inflated IDAT of a PNG, checking signature and chunk CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc
        if kind == b"IHDR":
            width, height = struct.unpack(">II", payload[:8])
        elif kind == b"IDAT":
            idat += payload
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.timeout(30)
def test_module_runs_standalone_and_writes_real_pngs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stderr = (tmp_path / "stderr.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "plugins.simulator", "--port", "0", "--base-dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("ComfyUI simulator listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(base_url=url, timeout=10) as http:
            stats = http.get("/system_stats")
            assert stats.status_code == 200
            assert stats.json()["system"]["comfyui_version"] == "0.12.1"
            prompt = json.loads((WORKFLOWS / "tiny.json").read_text())
            ws_url = url.replace("http://", "ws://") + "/ws?clientId=cli-test"
            with connect(ws_url, open_timeout=10) as ws:
                body = {"prompt": prompt, "client_id": "cli-test"}
                prompt_id = http.post("/prompt", json=body).json()["prompt_id"]
                while True:  # until the done signal; recv's timeout bounds each wait
                    message = json.loads(ws.recv(timeout=10))
                    if message["type"] == "executing" and message["data"]["node"] is None:
                        break
            entry = http.get(f"/history/{prompt_id}").json()
            image = entry[prompt_id]["outputs"]["3"]["images"][0]
            view = http.get("/view", params={"filename": image["filename"], "type": "output"})
            width, height, raw = read_png(view.content)
            assert (width, height) == (64, 64)
            assert len(raw) == 64 * (1 + 64 * 3)
            assert raw[1:4] == b"\xff\xff\xff"  # EmptyImage colour 0, inverted
            on_disk = tmp_path / "comfy-output" / image["filename"]
            assert on_disk.read_bytes() == view.content
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
            stderr.close()
