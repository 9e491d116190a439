"""Which stored files a caller may reach: its uploads, and the outputs of its own jobs.

Output keys start with their job's id (`<job_id>/<name>`, plugins/comfyui/outputs.py); uploads
through the ComfyUI-compatible API sit under their caller (`uploads/<caller>/...`). An admin
reaches every key; a user key reaches another's file nowhere, neither to read it (`/images`)
nor to feed it to a job (an input with `source: key`).
"""

from __future__ import annotations

from gateway.api.auth import Caller
from gateway.api.errors import ApiError
from gateway.api.native.uploads import UPLOADS, caller_folder
from gateway.api.services import Services
from gateway.bus.contract import JobInput


async def owns_key(services: Services, caller: Caller, key: str) -> bool:
    """Whether `caller` may read the stored object `key`."""
    if caller.admin:
        return True
    head, _, rest = key.lstrip("/").partition("/")
    if head == UPLOADS:
        return rest.startswith(caller_folder(caller.id) + "/")
    try:
        await services.record(head, caller)
    except ApiError:
        return False
    return True


async def check_inputs_owned(services: Services, caller: Caller, inputs: list[JobInput]) -> None:
    """A 404 for an input given by storage key that the caller may not read.

    The same answer as for a key that holds nothing, so no key can be probed this way.
    """
    for item in inputs:
        if item.source == "key" and not await owns_key(services, caller, item.value):
            raise ApiError(
                404,
                "not_found",
                f"input {item.name!r}: nothing is stored under {item.value!r}",
            )
