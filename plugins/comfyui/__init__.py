"""The ComfyUI adapter: runs the jobs bound to one ComfyUI server and reports on it.

    run_adapter(nc, settings, stop, server_id=..., address=...)   in-process (comfyautomate up)
    comfyautomate adapter --server-id S --address HOST:PORT        a process (cli.py)

Modules: client (HTTP), messages (ComfyUI's shapes), progress (the websocket), inputs,
outputs, failures (errors in plain words), runner (one job), heartbeat, control, adapter.
"""

from plugins.comfyui.adapter import run_adapter
from plugins.comfyui.options import AdapterOptions

__all__ = ["AdapterOptions", "run_adapter"]
