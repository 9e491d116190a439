"""The server's health, load and capabilities, published as a Heartbeat about once a second.

Health is a GET /queue with a short time limit at every beat, so a dead or hung ComfyUI shows
as unhealthy at the next beat (within about two intervals). Capabilities (/object_info, the
model folders, /system_stats) are large and change rarely: they are refreshed every minute and
sent only when they changed, plus every ~30 s for a balancer that started late.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from nats.aio.client import Client

from gateway.bus.contract import Capabilities, Heartbeat, encode, now
from plugins.comfyui.client import ComfyClient, ComfyError
from plugins.comfyui.residency import Residency

log = logging.getLogger(__name__)

# Combo inputs that name model files, and the folder each lists: used when /models is missing.
_MODEL_INPUTS: Final = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "vae_name": "vae",
    "control_net_name": "controlnet",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "upscale_model_name": "upscale_models",
    "style_model_name": "style_models",
    "gligen_name": "gligen",
}


def capabilities_hash(capabilities: Capabilities) -> str:
    """A stable digest of the encoded capabilities (fields in a fixed order, lists sorted)."""
    return hashlib.sha256(encode(capabilities)).hexdigest()[:32]


def models_from_object_info(object_info: dict[str, Any]) -> dict[str, list[str]]:
    """Model files per folder, read from the combo lists of loader nodes."""
    models: dict[str, set[str]] = {}
    for entry in object_info.values():
        inputs = entry.get("input", {}) if isinstance(entry, dict) else {}
        for section in ("required", "optional"):
            for name, spec in (inputs.get(section) or {}).items():
                folder = _MODEL_INPUTS.get(name)
                if folder and isinstance(spec, list) and spec and isinstance(spec[0], list):
                    models.setdefault(folder, set()).update(str(v) for v in spec[0])
    return {folder: sorted(files) for folder, files in sorted(models.items())}


async def read_capabilities(client: ComfyClient) -> Capabilities:
    """Node types, model files per folder, device and VRAM of the server."""
    object_info = await client.object_info()
    folders = await client.model_folders()
    if folders is None:
        models = models_from_object_info(object_info)
    else:
        listed = await asyncio.gather(*(client.models(folder) for folder in folders))
        models = {
            f: sorted(files) for f, files in sorted(zip(folders, listed, strict=True)) if files
        }
    stats = await client.system_stats()
    device = stats.devices[0] if stats.devices else None
    return Capabilities(
        node_types=sorted(object_info),
        models=models,
        device=device.name if device is not None else None,
        vram_total=device.vram_total if device is not None else None,
        vram_free=device.vram_free if device is not None else None,
    )


class Monitor:
    """Watches one ComfyUI server and publishes its heartbeat."""

    def __init__(
        self,
        client: ComfyClient,
        *,
        server_id: str,
        address: str,
        capacity: int,
        weight: float,
        labels: dict[str, str],
        interval_s: float,
        refresh_s: float = 60.0,
        resend_s: float = 30.0,
        on_unhealthy: Callable[[str], None] | None = None,
        taken_out: Callable[[], str | None] = lambda: None,
        residency: Residency | None = None,
    ) -> None:
        self._client = client
        self.residency = residency or Residency()
        self._taken_out = taken_out  # why the server must get no work for now (breaker.py)
        self.server_id = server_id
        self.address = address
        self.capacity = capacity
        self.weight = weight
        self.labels = labels
        self.interval_s = interval_s
        self._refresh_s = refresh_s
        self._resend_s = resend_s
        self._on_unhealthy = on_unhealthy
        self.healthy = False
        self.reason: str | None = "not checked yet"
        self.queue_running = 0
        self.queue_pending = 0
        self._queue_seen = 0.0
        self.capabilities: Capabilities | None = None
        self.capabilities_digest = ""
        self._refreshed_at = -float("inf")
        self._sent_digest = ""
        self._sent_at = -float("inf")
        self._refreshing: asyncio.Task[None] | None = None
        self._beat_now = asyncio.Event()

    def beat_now(self) -> None:
        """Send the next heartbeat at once (the server was just taken out, say)."""
        self._beat_now.set()

    def unhealthy(self) -> str | None:
        """Why the server is unhealthy, or None."""
        return None if self.healthy else (self.reason or "unhealthy")

    def note_queue_remaining(self, remaining: int) -> None:
        """A websocket `status` message: running plus pending, fresher than the last poll."""
        self.queue_running = min(1, remaining)
        self.queue_pending = max(0, remaining - 1)
        self._queue_seen = time.monotonic()

    async def check(self) -> None:
        """Probe the server once (GET /queue) and update health and queue counts."""
        limit = max(0.5, min(2.0, self.interval_s * 1.5))
        asked = time.monotonic()
        try:
            queue = await self._client.queue(time_limit=limit)
        except ComfyError as exc:
            self._set_health(False, str(exc))
            return
        if self._queue_seen <= asked:
            self.queue_running = len(queue.queue_running)
            self.queue_pending = len(queue.queue_pending)
        self._set_health(True, None)

    def _set_health(self, healthy: bool, reason: str | None) -> None:
        was = self.healthy
        self.healthy, self.reason = healthy, reason
        if was and not healthy:
            log.warning("ComfyUI at %s is unhealthy: %s", self.address, reason)
            if self._on_unhealthy is not None:
                self._on_unhealthy(reason or "unhealthy")
        elif healthy and not was:
            log.info("ComfyUI at %s is healthy", self.address)

    async def refresh_capabilities(self) -> Capabilities | None:
        """Read the capabilities now; keep the previous ones if the server does not answer."""
        try:
            capabilities = await read_capabilities(self._client)
        except ComfyError as exc:
            log.warning("cannot read the capabilities of %s: %s", self.address, exc)
            return self.capabilities
        self._refreshed_at = time.monotonic()
        self.capabilities = capabilities
        self.capabilities_digest = capabilities_hash(capabilities)
        return capabilities

    def _refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():

            async def refresh() -> None:
                await self.refresh_capabilities()

            self._refreshing = asyncio.create_task(refresh(), name=f"capabilities-{self.server_id}")

    def beat(self, in_flight: list[str], *, stopping: bool = False) -> Heartbeat:
        """The heartbeat to publish now; carries the capabilities when due."""
        include = None
        clock = time.monotonic()
        if self.capabilities is not None and (
            self.capabilities_digest != self._sent_digest or clock - self._sent_at >= self._resend_s
        ):
            include = self.capabilities
            self._sent_digest, self._sent_at = self.capabilities_digest, clock
        taken_out = self._taken_out()
        if stopping:
            reason: str | None = "the adapter is stopping"
        elif self.healthy and taken_out is not None:
            reason = taken_out
        else:
            reason = self.reason
        return Heartbeat(
            server_id=self.server_id,
            address=self.address,
            ts=now(),
            healthy=self.healthy and not stopping and taken_out is None,
            reason=reason,
            queue_running=self.queue_running,
            queue_pending=self.queue_pending,
            in_flight=in_flight,
            capacity=self.capacity,
            weight=self.weight,
            labels=self.labels,
            capabilities_hash=self.capabilities_digest,
            capabilities=include,
            interval_s=self.interval_s,
            resident_models=list(self.residency.models),
            model_slots=self.residency.slots,
        )

    async def run(self, nc: Client, subject: str, in_flight: Callable[[], list[str]]) -> None:
        """Check and publish every interval until cancelled."""
        try:
            while True:
                started = time.monotonic()
                await self.check()
                if self.healthy and started - self._refreshed_at >= self._refresh_s:
                    if self.capabilities is None:
                        await self.refresh_capabilities()  # the first beat should carry them
                    else:
                        self._refresh_in_background()
                await nc.publish(subject, encode(self.beat(in_flight())))
                self._beat_now.clear()
                elapsed = time.monotonic() - started
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, self.interval_s - elapsed)):
                        await self._beat_now.wait()
        finally:
            if self._refreshing is not None:
                self._refreshing.cancel()
