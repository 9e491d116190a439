"""Uploads into subfolders, as the adapter makes them for a job's input files: kept there, loaded
by "sub/name.png", left out of LoadImage's choices, and emptied in place with `overwrite`, as
ComfyUI's /upload/image and LoadImage do."""

from __future__ import annotations

import httpx

from plugins.simulator import Simulator, png
from tests.simulator.test_features import run_prompt

SUB = "comfyautomate-jobs/job1-1"


async def test_an_upload_into_nested_subfolders_is_kept_there(sim: Simulator) -> None:
    data = png.encode_solid(4, 4, (1, 2, 3))
    async with httpx.AsyncClient(base_url=sim.url) as http:
        files = {"image": ("in.png", data, "image/png")}
        reply = await http.post("/upload/image", files=files, data={"subfolder": SUB})
        assert reply.json() == {"name": "in.png", "subfolder": SUB, "type": "input"}
        assert (sim.folders.input / SUB / "in.png").read_bytes() == data
        assert not (sim.folders.input / "in.png").exists()
        view = await http.get(
            "/view", params={"filename": "in.png", "subfolder": SUB, "type": "input"}
        )
        assert view.content == data
        # LoadImage lists the input folder's own files only, as ComfyUI's does.
        info = (await http.get("/object_info/LoadImage")).json()
        assert info["LoadImage"]["input"]["required"]["image"][0] == []

        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": f"{SUB}/in.png"}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "s"},
            },
        }
        _, messages = await run_prompt(sim, prompt)
        assert "execution_success" in [m["type"] for m in messages], messages

        empty = {"image": ("in.png", b"", "application/octet-stream")}
        answer = {"subfolder": SUB, "overwrite": "true"}
        reply = await http.post("/upload/image", files=empty, data=answer)
        assert reply.json() == {"name": "in.png", "subfolder": SUB, "type": "input"}
        assert (sim.folders.input / SUB / "in.png").read_bytes() == b""
        assert [p.name for p in (sim.folders.input / SUB).iterdir()] == ["in.png"]
