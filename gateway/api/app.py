"""`create_app`: the Litestar application, built around the process's shared Services."""

from __future__ import annotations

from litestar import Litestar
from litestar.config.response_cache import ResponseCacheConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.api.images import image
from gateway.api.logs import job_logs, logs_query, recent_jobs
from gateway.api.servers import ServerController
from gateway.api.services import Services
from gateway.api.system import health, metrics
from gateway.api.workflows import WorkflowController, job_events_ws

# Workflows are JSON graphs; 10 MB is far above any real one and far below harm.
MAX_BODY_BYTES = 10 * 1024 * 1024


def create_app(services: Services, *, max_body_bytes: int = MAX_BODY_BYTES) -> Litestar:
    """The REST API over `services`; OpenAPI at /schema, a docs UI at /schema/swagger."""
    return Litestar(
        route_handlers=[
            WorkflowController,
            job_events_ws,
            ServerController,
            image,
            job_logs,
            logs_query,
            recent_jobs,
            health,
            metrics,
        ],
        dependencies={"services": Provide(lambda: services, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="ComfyAutomate",
            version="0.1.0",
            description="Run ComfyUI workflows across a fleet of GPU servers.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        response_cache_config=ResponseCacheConfig(),
        # The process sets up logging once for every role; Litestar must not add its own.
        logging_config=None,
    )
