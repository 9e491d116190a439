"""`/workflow/batch`: submit many jobs under one id, follow them, cancel them together."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from gateway.api.auth import caller_of
from gateway.api.batches import Batches
from gateway.api.errors import error_responses
from gateway.api.limits import submit_rate_limit
from gateway.api.schemas import BatchStatus, BatchSubmission
from gateway.api.services import Services, ServicesDep
from gateway.api.workflows import REPLAYED_HEADER, IdempotencyKey, to_result
from gateway.bus.contract import BatchRecord


async def _batches(services: Services) -> Batches:
    return Batches(services, await services.js.key_value(services.subjects.batches_bucket))


async def _status(
    batches: Batches, record: BatchRecord, services: Services, request: Request[Any, Any, Any]
) -> BatchStatus:
    now = time.time()  # one answer: every job's URLs signed as of one moment
    return await batches.status(record, lambda job: to_result(job, services, request, now=now))


class BatchController(Controller):
    path = "/workflow/batch"
    tags = ("workflows",)

    @post(
        "/",
        status_code=202,
        guards=[submit_rate_limit],
        responses={
            200: ResponseSpec(
                data_container=BatchStatus,
                description="The same batch sent again: the jobs it lacked are made",
                generate_examples=False,
            ),
            **error_responses(400, 404, 409, 413, 422, 429, 503, 504),
        },
    )
    async def submit(
        self,
        data: JSONBody[BatchSubmission],
        services: ServicesDep,
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[BatchStatus]:
        """Submit a batch: one job per override set (or per workflow), under one batch id.

        202 with the batch; the same batch again (same id, or same Idempotency-Key, and the
        same jobs) makes only the jobs a cut-short submission had not made, and answers 200.
        """
        batches = await _batches(services)
        record, replayed = await batches.submit(data, caller_of(request), idempotency_key)
        status = await _status(batches, record, services, request)
        if replayed:
            return Response(status, status_code=200, headers={REPLAYED_HEADER: "true"})
        return Response(status, status_code=202)

    @get("/{batch_id:str}", responses=error_responses(404))
    async def status(
        self, batch_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
    ) -> BatchStatus:
        """The batch now: each job with its status and outputs, and counts by status."""
        batches = await _batches(services)
        record = await batches.find(batch_id, caller_of(request))
        return await _status(batches, record, services, request)

    @post("/{batch_id:str}/cancel", status_code=200, responses=error_responses(404))
    async def cancel(
        self, batch_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
    ) -> BatchStatus:
        """Cancel every job of the batch not ended, and the jobs not made yet."""
        batches = await _batches(services)
        record = await batches.cancel(batch_id, caller_of(request))
        return await _status(batches, record, services, request)
