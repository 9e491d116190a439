"""The SDK's idempotency keys and batches, sync and async, against a real gateway and balancer
(no ComfyUI: the jobs wait in the queue, which is all these calls need)."""

from __future__ import annotations

import asyncio

import pytest

from sdk import AsyncComfyUISDK, ComfyUISDK, IdempotencyMismatch
from tests.e2e.conftest import tiny


def _drive_sync(url: str) -> None:
    with ComfyUISDK(gateway_url=url, timeout=30) as sdk:
        first = sdk.submit_workflow(tiny(1), idempotency_key="sdk-key", priority=0)
        # The SDK's defaults and the same values written out are the same request.
        assert sdk.submit_workflow(tiny(1), idempotency_key="sdk-key") == first
        with pytest.raises(IdempotencyMismatch) as refused:
            sdk.submit_workflow(tiny(2), idempotency_key="sdk-key")
        assert refused.value.details["job_id"] == first
        assert sdk.submit_workflow(tiny(1), idempotency_key="sdk-key-2") != first

        sets = [{"1.color": i} for i in range(3)]
        batch = sdk.submit_batch(tiny(3), overrides=sets, idempotency_key="sdk-batch")
        assert (batch.size, batch.counts) == (3, {"queued": 3})
        again = sdk.submit_batch(tiny(3), overrides=sets, idempotency_key="sdk-batch")
        assert again.batch_id == batch.batch_id
        assert sdk.get_batch(batch.batch_id).jobs[2].job_id == f"{batch.batch_id}-2"
        ended = sdk.cancel_batch(batch.batch_id)
        assert ended.counts == {"cancelled": 3} and ended.done
        assert sdk.wait_batch(batch.batch_id, timeout=5).done


async def test_the_sync_client(gateway: str) -> None:
    await asyncio.to_thread(_drive_sync, gateway)


async def test_the_async_client(gateway: str) -> None:
    async with AsyncComfyUISDK(gateway, timeout=30) as sdk:
        first = await sdk.submit_workflow(tiny(4), idempotency_key="async-key")
        assert await sdk.submit_workflow(tiny(4), idempotency_key="async-key") == first
        with pytest.raises(IdempotencyMismatch):
            await sdk.submit_workflow(tiny(5), idempotency_key="async-key")

        batch = await sdk.submit_batch(
            [tiny(6), tiny(7)], batch_id="async-batch", labels={"tier": "any"}
        )
        assert (batch.batch_id, batch.counts) == ("async-batch", {"queued": 2})
        again = await sdk.submit_batch(
            [tiny(6), tiny(7)], batch_id="async-batch", labels={"tier": "any"}
        )
        assert [job.job_id for job in again.jobs] == ["async-batch-0", "async-batch-1"]
        ended = await sdk.cancel_batch("async-batch")
        assert ended.counts == {"cancelled": 2}
        assert (await sdk.wait_batch("async-batch", timeout=5)).done
        assert (await sdk.get_batch("async-batch")).cancelled
