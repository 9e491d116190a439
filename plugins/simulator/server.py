"""Running the simulator: the Simulator object, `run_simulator` and `serve`.

uvicorn serves the raw ASGI app (see asgi.py for why not Litestar) on a socket we bind
ourselves, so port 0 works and the real port is known before the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from .config import SimulatorConfig
from .engine import Engine
from .folders import Folders
from .hub import Hub
from .nodedefs import IMAGE_EXTENSIONS, NodeRegistry
from .routes import App

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 70


class Simulator:
    """One fake ComfyUI server. Start with `start()` or use `run_simulator(...)`."""

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self._requested_port = port
        self.port = 0
        self.crashed = asyncio.Event()
        self.stopped = asyncio.Event()
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.folders = self._make_folders()
        self.hub = Hub(self.config.drop_ws_on_message)
        registry = NodeRegistry(self.config.node_types, self.config.models, self._input_files)
        self.engine = Engine(self.config, self.folders, registry, self.hub, self._on_crash)
        self.app = App(self.engine, self._abort_client)

    @property
    def address(self) -> str:
        """ "host:port" with the real bound port."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.address}/ws"

    def _make_folders(self) -> Folders:
        config = self.config
        base = config.base_dir
        if base is None and None in (config.output_dir, config.input_dir, config.temp_dir):
            self._temp = tempfile.TemporaryDirectory(prefix="comfy-sim-")
            base = self._temp.name
        root = Path(base) if base is not None else Path.cwd()

        def folder(given: str | None, name: str) -> Path:
            path = Path(given) if given is not None else root / name
            path.mkdir(parents=True, exist_ok=True)
            return path.resolve()

        return Folders(
            output=folder(config.output_dir, "comfy-output"),
            input=folder(config.input_dir, "comfy-input"),
            temp=folder(config.temp_dir, "comfy-temp"),
        )

    def _input_files(self) -> list[str]:
        files = [
            p.name
            for p in self.folders.input.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        return sorted(files)

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, start serving and start the queue worker."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every response pays a 40 ms delayed-ACK stall.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.app.argv = [
            "main.py",
            "--cpu",
            "--listen",
            self.host,
            "--port",
            str(self.port),
            "--output-directory",
            str(self.folders.output),
            "--input-directory",
            str(self.folders.input),
            "--temp-directory",
            str(self.folders.temp),
            "--disable-auto-launch",
        ]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            ws="websockets-sansio",
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._tasks.append(asyncio.create_task(server.main_loop(), name="sim-http"))
        self._tasks.append(asyncio.create_task(self.engine.run(), name="sim-worker"))
        if self.config.drop_ws_every_seconds:
            self._tasks.append(asyncio.create_task(self._drop_loop(), name="sim-drops"))

    async def stop(self) -> None:
        """Stop serving and the worker; safe to call twice."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        try:
            self.app.release_hangs()
            for conn in list(self.hub.sockets.values()):
                conn.close()
            server = self._server
            if server is not None:
                server.should_exit = True
            for task in self._tasks:
                if task.get_name() != "sim-http":
                    task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if server is not None and self._sock is not None:
                await server.shutdown(sockets=[self._sock])
            if self._sock is not None:
                self._sock.close()
            if self._temp is not None:
                self._temp.cleanup()
        finally:
            self.stopped.set()

    async def _drop_loop(self) -> None:
        interval = self.config.drop_ws_every_seconds or 0
        while True:
            await asyncio.sleep(interval / max(self.config.speed, 1e-9))
            self.drop_websockets()

    # --- faults --------------------------------------------------------------------------

    def _abort_client(self, client: Any) -> None:
        server = self._server
        if server is None or client is None:
            return
        for protocol in list(server.server_state.connections):
            if getattr(protocol, "client", None) == tuple(client):
                protocol.transport.abort()

    def drop_websockets(self) -> int:
        """Cut every websocket abruptly (no close frame); returns how many were cut."""
        return self.hub.drop_all()

    def set_hang(self, hang: bool = True) -> None:
        """Hang the queue: prompts are accepted but not run until `set_hang(False)`."""
        self.engine.set_hang(hang)

    def hold_setup(self, hold: bool = True) -> None:
        """Keep a started prompt from running its nodes (after `execution_start`) until
        released: a real server's setup takes as long as a replayed client needs."""
        if hold:
            self.engine.setup_gate.clear()
        else:
            self.engine.setup_gate.set()

    def hold_nodes(self, class_type: str, hold: bool = True) -> None:
        """Keep nodes of `class_type` from running until released: a prompt is then still
        running at the moment a test chooses, however slow the machine, without a long node
        time to wait out."""
        if hold:
            self.engine.node_gates.setdefault(class_type, asyncio.Event())
        elif (gate := self.engine.node_gates.pop(class_type, None)) is not None:
            gate.set()

    def set_fail_prompt(self, fail: bool = True) -> None:
        """Answer POST /prompt with a 500, as a broken ComfyUI does (or answer again)."""
        self.config.fail_prompt = fail

    def set_hang_http(self, hang: bool = True) -> None:
        """Stop answering HTTP and websocket handshakes (or answer again)."""
        self.app.hang_http = hang

    def crash(self) -> None:
        """Die abruptly: every connection is cut, the port closes, the worker stops."""
        self._on_crash()
        for task in self._tasks:
            if task.get_name() == "sim-worker":
                task.cancel()

    def _on_crash(self) -> None:
        if self.config.crash_exits_process:
            log.error("simulated crash: exiting the process")
            os._exit(CRASH_EXIT_CODE)
        if self.crashed.is_set():
            return
        self.crashed.set()
        server = self._server
        if server is not None:
            for listener in getattr(server, "servers", []):
                listener.close()
            for protocol in list(server.server_state.connections):
                protocol.transport.abort()
            server.should_exit = True
        if self._sock is not None:
            self._sock.close()


@contextlib.asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """A running simulator for the duration of the block; always stopped on exit."""
    simulator = Simulator(config, host, port)
    try:
        await simulator.start()
        yield simulator
    finally:
        await simulator.stop()


async def serve(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8188,
    ready: Any = None,
) -> int:
    """Run in the foreground until SIGINT/SIGTERM (or a crash); returns an exit code.

    `ready`, if given, is called with the Simulator once it listens.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with run_simulator(config, host, port) as simulator:
            if ready is not None:
                ready(simulator)
            crashed = asyncio.create_task(simulator.crashed.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({crashed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            crashed.cancel()
            stopped.cancel()
            return CRASH_EXIT_CODE if simulator.crashed.is_set() else 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
