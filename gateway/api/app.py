"""`create_app`: the Litestar application, built around the process's shared Services."""

from __future__ import annotations

from litestar import Litestar
from litestar.config.response_cache import ResponseCacheConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.types import BeforeMessageSendHookHandler, Message, Scope

from gateway.api.auth import ApiKeyGuard, caller_secret, check_settings
from gateway.api.batchroutes import BatchController
from gateway.api.bodies import reject_deep_json
from gateway.api.dashboard import dashboard_page, static_files
from gateway.api.errors import EXCEPTION_HANDLERS, refuse_websockets_over_http
from gateway.api.fleetevents import fleet_event_stream
from gateway.api.images import image
from gateway.api.limits import STATE_KEY, Limits, RateLimited, rate_limited, too_large
from gateway.api.logs import job_logs, logs_query, recent_jobs
from gateway.api.native.routes import NATIVE_ROUTES
from gateway.api.openapi import openapi_config, refine_openapi
from gateway.api.queueshare import queue_share
from gateway.api.servers import SYSTEM_HEADER, ServerController
from gateway.api.services import Services
from gateway.api.signing import SIGNER_STATE, UrlSigner
from gateway.api.system import health, metrics
from gateway.api.webhooks import redeliver
from gateway.api.whoami import whoami
from gateway.api.workflows import WorkflowController, job_events_ws


def create_app(services: Services) -> Litestar:
    """The REST API over `services`; the dashboard at /, OpenAPI at /schema, a docs UI at
    /schema/swagger.

    Raises SettingsError when the settings cannot be served safely: an open API (no
    `api_keys`) on a host beyond loopback, a malformed key, a limit out of range.
    """
    settings = services.settings
    keys = check_settings(settings)
    signer = UrlSigner.from_settings(settings, caller_secret)
    limits = Limits(settings)
    guards = [ApiKeyGuard(keys)]
    return Litestar(
        route_handlers=[
            WorkflowController,
            BatchController,
            job_events_ws,
            fleet_event_stream,
            ServerController,
            image,
            job_logs,
            logs_query,
            recent_jobs,
            queue_share,
            whoami,
            redeliver,
            health,
            metrics,
            *NATIVE_ROUTES,
            dashboard_page,
            static_files(),
        ],
        dependencies={"services": Provide(lambda: services, sync_to_thread=False)},
        guards=guards,
        middleware=[refuse_websockets_over_http(guards)],
        before_request=reject_deep_json,
        exception_handlers={
            **EXCEPTION_HANDLERS,
            RateLimited: rate_limited,
            413: too_large(limits.max_body_bytes),
        },
        request_max_body_size=limits.max_body_bytes,
        state=State({STATE_KEY: limits, SIGNER_STATE: signer}),
        openapi_config=openapi_config(keys),
        on_startup=[refine_openapi],
        response_cache_config=ResponseCacheConfig(),
        before_send=[_mark_as_this_system(services)],
        # The process sets up logging once for every role; Litestar must not add its own.
        logging_config=None,
    )


def _mark_as_this_system(services: Services) -> BeforeMessageSendHookHandler:
    """Every answer names this system (see servers.probe): a gateway is never its own server."""

    async def mark(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start" and services.system_id:
            headers = MutableScopeHeaders.from_message(message)
            headers[SYSTEM_HEADER] = services.system_id

    return mark
