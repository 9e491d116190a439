"""Realistic jobs for the log sink tests: the events the balancer and an adapter publish."""

from __future__ import annotations

from gateway.bus.contract import (
    DispatchedData,
    Event,
    EventData,
    FailedData,
    HistoryData,
    JobRequest,
    NodeOutputData,
    NodeProgressData,
    NodeStartedData,
    OutputFile,
    QueuedData,
    RunningData,
    SucceededData,
    prompt_id_for,
)
from gateway.bus.events import EventPublisher
from gateway.logsink import SinkConfig, log_file_relpath

# Short waits: a redelivery after a kill comes within a second.
FAST = SinkConfig(ack_wait_s=1.0, pull_expires_s=1.0, memory_limit="256MB", retry_min_s=0.05)


def workflow(nodes: int = 3) -> dict[str, dict[str, object]]:
    return {
        str(i): {"class_type": f"Node{i}", "inputs": {"seed": i, "text": "a cat\nin a hat"}}
        for i in range(1, nodes + 1)
    }


async def run_job(
    publisher: EventPublisher,
    job_id: str,
    *,
    submitted_at: float,
    server: str = "gpu1",
    fail: bool = False,
    nodes: int = 3,
    progress: int = 2,
    caller: str | None = None,
    batch_id: str | None = None,
) -> list[Event]:
    """The events of one job as the balancer and an adapter publish them, `ts` 1 s apart."""
    emitted: list[Event] = []
    clock = [submitted_at]

    async def emit(data: EventData, server_id: str | None = server) -> None:
        event = await publisher.emit(job_id, data, server_id=server_id, ts=clock[0])
        emitted.append(event)
        clock[0] += 1.0

    request = JobRequest(
        workflow=workflow(nodes), metadata={"user": "test"}, caller=caller, batch_id=batch_id
    )
    await emit(
        QueuedData(request=request, log_file_path=log_file_relpath(job_id, submitted_at)),
        server_id=None,
    )
    await emit(DispatchedData(server_id=server, attempt=1), server_id=None)
    await emit(RunningData(attempt=1, prompt_id=prompt_id_for(job_id, 1)))
    for node in range(1, nodes + 1):
        await emit(NodeStartedData(node_id=str(node), class_type=f"Node{node}"))
        for step in range(progress):
            await emit(NodeProgressData(node_id=str(node), value=step + 1, max=progress))
        if fail and node == nodes:
            await emit(
                FailedData(
                    code="execution_error",
                    message="CUDA out of memory",
                    attempt=1,
                    node_id=str(node),
                    node_type=f"Node{node}",
                    exception_type="torch.OutOfMemoryError",
                    traceback=["Traceback (most recent call last):\n", "  OOM\n"],
                )
            )
            return emitted
        await emit(NodeOutputData(node_id=str(node), output={"images": [{"filename": "x.png"}]}))
    output = OutputFile(
        node_id=str(nodes),
        filename="x.png",
        key=f"{job_id}/x.png",
        size=10,
        content_type="image/png",
        url=f"/images/{job_id}/x.png",
    )
    await emit(
        HistoryData(
            prompt_id=prompt_id_for(job_id, 1),
            history={"status": {"status_str": "success"}, "outputs": {}},
        )
    )
    await emit(SucceededData(attempt=1, outputs=[output], duration_s=float(nodes)))
    return emitted
