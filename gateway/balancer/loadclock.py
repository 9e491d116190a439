"""How long each running job's loader nodes took, from the node events the leader reads.

A node's time is from its `node_started` to the next node's (or the job's end): ComfyUI runs
one node at a time, and the adapter stamps each event when its message arrives. Only loader
nodes are kept, as seconds per model: a node that loads several files splits its time evenly.
A loader served from the cache sends no `node_started`: it loaded nothing.
"""

from __future__ import annotations

from gateway.comfyui.shape import JobShape


class LoadClock:
    """Per running job: the node open now, and what its loaders took so far."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[tuple[str, ...], float]] = {}  # job -> (models, started)
        self._loads: dict[str, dict[str, float]] = {}  # job -> model -> seconds

    def node_started(
        self, job_id: str, shape: JobShape | None, node_id: str, ts: float
    ) -> dict[str, float]:
        """A node of the job started at `ts`: the one before it ended then. Returns what that
        one loaded (model -> seconds), if it was a loader."""
        done = self._close(job_id, ts)
        models = dict(shape.loaders).get(node_id, ()) if shape is not None else ()
        if models:
            self._open[job_id] = (models, ts)
        return done

    def ended(self, job_id: str, ts: float) -> tuple[dict[str, float], dict[str, float]]:
        """The job ended at `ts`: (what its last node loaded, if a loader; all its loads),
        each model -> seconds, forgotten here."""
        done = self._close(job_id, ts)
        return done, self._loads.pop(job_id, {})

    def forget(self, job_id: str) -> None:
        self._open.pop(job_id, None)
        self._loads.pop(job_id, None)

    def _close(self, job_id: str, ts: float) -> dict[str, float]:
        opened = self._open.pop(job_id, None)
        if opened is None:
            return {}
        models, started = opened
        share = max(0.0, ts - started) / len(models)
        loads = self._loads.setdefault(job_id, {})
        for model in models:
            loads[model] = loads.get(model, 0.0) + share
        return dict.fromkeys(models, share)
