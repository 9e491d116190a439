"""The adapter's tunables, with defaults for a real GPU server; tests shorten the timings."""

from __future__ import annotations

import math

import msgspec

from gateway.settings import Settings, SettingsError


class AdapterOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Timings and limits of one adapter. Durations are in seconds."""

    default_timeout_s: float = 3600.0
    """A job without `timeout_s` ends `failed` (code timeout) once it has run this long."""
    start_wait_s: float = 3600.0
    """A prompt that ComfyUI has not started this long after the job came is taken off its
    queue, and the job handed back (`retried`, a try that counts)."""
    silence_s: float = 5.0
    """A job whose socket has been silent this long is cross-checked with /history and /queue."""
    poll_s: float = 0.5
    """How often a job followed without a websocket is polled."""
    unreachable_grace_s: float = 3.0
    """A submitted job whose ComfyUI stays unreachable this long is handed back."""
    stop_wait_s: float = 10.0
    """After an interrupt, how long to wait for the prompt to leave ComfyUI's queue."""
    grace_s: float = 30.0
    """On shutdown, how long running jobs may go on before they are handed back."""
    ack_wait_s: float = 30.0
    """JetStream redelivers a job whose adapter stopped confirming progress for this long."""
    fetch_wait_s: float = 0.5
    """How long one wait for the next job lasts (a fetch, or a wait for a free slot): a
    stopping adapter lets the one under way end, so it stops within this."""
    capabilities_refresh_s: float = 60.0
    capabilities_resend_s: float = 30.0
    max_input_bytes: int = 200 * 1024 * 1024
    url_timeout_s: float = 60.0
    url_allowlist: tuple[str, ...] = ()
    """Hosts and networks besides public addresses that URL inputs may come from (see inputs.py);
    the setting `url_input_allowlist`."""
    comfyui_input_dir: str | None = None
    """ComfyUI's input folder as this adapter sees it (the same machine, a shared disk): a job's
    input files are then deleted when it ends, not only emptied (see inputfiles.py)."""

    def __post_init__(self) -> None:
        # A time of 0 or less, or NaN, would end every job at once, or never.
        for name in _TIMES:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{name} must be seconds over 0, not {value}")


_TIMES = ("grace_s", "ack_wait_s", "default_timeout_s", "start_wait_s", "fetch_wait_s")


def with_settings(options: AdapterOptions, settings: Settings) -> AdapterOptions:
    """`options` plus what the deployment's settings add to them: the URL input allowlist."""
    extra = tuple(e for e in settings.url_input_allowlist if e not in options.url_allowlist)
    if not extra:
        return options
    return msgspec.structs.replace(options, url_allowlist=options.url_allowlist + extra)
