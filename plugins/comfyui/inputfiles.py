"""One attempt's input files on ComfyUI: uploaded into a folder of its own, cleared at its end.

Each attempt uploads into `comfyautomate-jobs/<job id>-<attempt>/` of ComfyUI's input folder
(gateway/comfyui/jobfiles.py), so no other job finds its files by their plain names, and
workflows naming that folder are refused at submission.

ComfyUI cannot delete an input file over HTTP: /upload/image only writes, and the assets API's
DELETE (behind --enable-assets) drops a database reference and keeps the file. So at the end of
the attempt each of its files is overwritten with an empty file of the same name (`overwrite`):
the content is gone, and the empty file stays under a name no workflow may use. An adapter
that sees ComfyUI's input folder (`comfyui_input_dir`: the same machine or a shared disk)
deletes the attempt's folder instead.

Left behind on a server without that: one empty file per input and its folder, per attempt;
and the files as uploaded of an attempt that ended while its server did not answer, or whose
adapter died (a new adapter never learns their names). Failures are logged with the job id.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from gateway.comfyui.jobfiles import JOB_FILES, job_folder
from plugins.comfyui.client import ComfyClient, ComfyError
from plugins.comfyui.messages import UploadResult

log = logging.getLogger(__name__)

CLEAR_TIME_LIMIT_S: Final = 5.0
"""How long clearing one attempt's files may take before they are left (and logged)."""


class JobFiles:
    """The input files one attempt put on ComfyUI, and clearing them."""

    def __init__(
        self, client: ComfyClient, job_id: str, attempt: int, input_dir: str | None = None
    ) -> None:
        self.folder = job_folder(job_id, attempt)
        self._client = client
        self._job_id = job_id
        self._attempt = attempt
        self._input_dir = input_dir
        self._names: set[str] = set()

    def expect(self, name: str) -> None:
        """An upload of `name` is under way: cleared even if its answer never comes."""
        self._names.add(name)

    def uploaded(self, result: UploadResult) -> None:
        """ComfyUI answered an upload with `result`.

        A new name ("x (1).png") means the asked one exists in the folder too: another input
        of this attempt, or an upload of an earlier delivery of it; both stay to be cleared.
        """
        if result.subfolder != self.folder:
            log.warning(
                "job %s: ComfyUI stored input %r in %r, not in %r; it will not be cleared",
                self._job_id,
                result.name,
                result.subfolder,
                self.folder,
            )
            return
        self._names.add(result.name)

    def adopt(self, workflow: dict[str, Any] | None, input_names: Iterable[str]) -> None:
        """Learn the files of an attempt submitted before (by an adapter that died, say).

        The workflow ComfyUI holds names them exactly; without it, the names an upload asks
        for (`input_names`) are the best guess.
        """
        prefix = self.folder + "/"
        found = {
            value[len(prefix) :]
            for node in (workflow or {}).values()
            if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
            for value in node["inputs"].values()
            if isinstance(value, str) and value.startswith(prefix)
        }
        self._names.update(found if workflow is not None else input_names)

    async def clear(self, unhealthy: str | None = None) -> None:
        """Delete or empty the attempt's files; what could not be cleared is logged, not raised.

        `unhealthy`: why ComfyUI does not answer now, if it does not: no request is tried.
        """
        if self._input_dir is not None and await self._delete_folder():
            self._names.clear()
            return
        if not self._names:
            return
        if unhealthy is not None:
            self._left(sorted(self._names), f"ComfyUI is unhealthy ({unhealthy})")
            return
        names = sorted(self._names)
        try:
            async with asyncio.timeout(CLEAR_TIME_LIMIT_S):
                results = await asyncio.gather(
                    *(self._blank(name) for name in names), return_exceptions=True
                )
        except TimeoutError:
            self._left(names, f"ComfyUI did not answer within {CLEAR_TIME_LIMIT_S:g} s")
            return
        for name, result in zip(names, results, strict=True):
            if isinstance(result, ComfyError):
                log.warning(
                    "job %s attempt %d: input file %s/%s not cleared: %s",
                    self._job_id,
                    self._attempt,
                    self.folder,
                    name,
                    result,
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                self._names.discard(name)

    async def _blank(self, name: str) -> None:
        """Overwrite `name` in the attempt's folder with an empty file."""
        result = await self._client.upload_image(
            name,
            io.BytesIO(b""),
            "application/octet-stream",
            subfolder=self.folder,
            overwrite=True,
            time_limit=CLEAR_TIME_LIMIT_S,
        )
        if result.name != name or result.subfolder != self.folder:
            raise ComfyError(f"ComfyUI wrote {result.subfolder}/{result.name} instead")

    async def _delete_folder(self) -> bool:
        """Delete the attempt's folder in the local input folder; whether that cleared it."""
        assert self._input_dir is not None
        base = Path(self._input_dir).resolve()
        folder = (base / self.folder).resolve()
        if not folder.is_relative_to(base / JOB_FILES):
            log.error("job %s: %s is outside %s; not deleting it", self._job_id, folder, base)
            return False
        if not folder.is_dir():
            if self._names:
                log.warning(
                    "job %s: %s does not exist: is comfyui_input_dir (%s) the input folder of "
                    "ComfyUI at %s? Emptying the files through ComfyUI instead",
                    self._job_id,
                    folder,
                    base,
                    self._client.address,
                )
                return False
            return True  # nothing was uploaded
        try:
            await asyncio.to_thread(shutil.rmtree, folder)
        except OSError as exc:
            job_id = self._job_id
            log.warning("job %s: could not delete %s (%s); emptying its files", job_id, folder, exc)
            return False
        return True

    def _left(self, names: list[str], why: str) -> None:
        log.warning(
            "job %s attempt %d: %s, so its input files stay on it as uploaded: %s",
            self._job_id,
            self._attempt,
            why,
            ", ".join(f"{self.folder}/{name}" for name in names),
        )
