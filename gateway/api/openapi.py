"""The API's OpenAPI description and its docs UI, both served by the gateway alone.

Summaries and descriptions come from the handlers' docstrings; streams and files are typed as
what they send (`text/event-stream`, bytes); ComfyUI's own routes have a tag of their own and
are listed once (each is also served under `/api`). Swagger UI's files are packaged (see
`static/swagger-ui/README.md`), so the docs render without internet.
"""

from __future__ import annotations

from typing import Final

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    Schema,
    Tag,
)

from gateway.api.auth import PUBLIC_PATHS, Keys, openapi_security
from gateway.api.dashboard import STATIC_PATH

SWAGGER_UI: Final = f"{STATIC_PATH}/swagger-ui"
COMFYUI_TAG: Final = "comfyui"
# Where ComfyUI serves each of its routes a second time; the description lists them once.
_COMFYUI_ALIAS: Final = "/api/"
_SSE: Final = "text/event-stream"
_BINARY: Final = "application/octet-stream"
# Routes that answer with a stored file's bytes.
FILE_PATHS: Final = frozenset({"/images/{key}", "/view"})
_METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

TAGS: Final = [
    Tag(name="workflows", description="Run workflows: submit, wait, follow, cancel, list."),
    Tag(name="servers", description="The fleet of ComfyUI servers (changes need an admin key)."),
    Tag(name="logs", description="Every job's log, and read-only SQL over the log index."),
    Tag(name="images", description="Stored outputs, served by what their bytes are."),
    Tag(name="system", description="Readiness and Prometheus metrics; no key needed."),
    Tag(
        name=COMFYUI_TAG,
        description=(
            "ComfyUI's own scripting API for the whole fleet: a script written for one ComfyUI "
            "works against the gateway. Every route is also served under `/api` (as ComfyUI "
            "does), and the `/ws` websocket relays each prompt's messages. Bodies are ComfyUI's "
            "own, not this API's error shape."
        ),
    ),
]


def openapi_config(keys: Keys) -> OpenAPIConfig:
    """OpenAPI at /schema, with a Swagger UI at /schema/swagger that loads nothing from afar."""
    components, security = openapi_security(keys)
    return OpenAPIConfig(
        title="ComfyAutomate",
        version="0.1.0",
        description=(
            "Run ComfyUI workflows across a fleet of GPU servers. With `api_keys` set, every "
            "route but /health, /metrics and /schema needs a key (`Authorization: Bearer KEY` "
            "or `X-API-Key: KEY`); an admin key manages the fleet and sees every job, a user "
            "key only its own jobs. The dashboard is at `/`."
        ),
        path="/schema",
        render_plugins=[
            SwaggerRenderPlugin(
                js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
                css_url=f"{SWAGGER_UI}/swagger-ui.css",
                standalone_preset_js_url=f"{SWAGGER_UI}/swagger-ui-standalone-preset.js",
                favicon=f"<link rel='icon' href='{STATIC_PATH}/favicon.svg'>",
            )
        ],
        components=components,
        security=security,
        tags=TAGS,
        use_handler_docstrings=True,
    )


def refine_openapi(app: Litestar) -> None:
    """Finish the generated description once, at start, before anyone reads it (on_startup)."""
    document = app.openapi_schema
    paths = document.paths or {}
    for path in [p for p in paths if p.startswith(_COMFYUI_ALIAS)]:
        del paths[path]
    for path, item in paths.items():
        for operation in _operations(item):
            _summarise(operation)
            if path in FILE_PATHS:
                _answer_bytes(operation)
            _type_streams(operation)
            if path in PUBLIC_PATHS:
                operation.security = []  # readiness and metrics answer without a key


def _answer_bytes(operation: Operation) -> None:
    """A stored file's route answers with its bytes, typed by what they are: say so (the route
    cannot declare it, or its declared type would be every answer's)."""
    ok = (operation.responses or {}).get("200")
    if isinstance(ok, OpenAPIResponse):
        ok.content = {_BINARY: OpenAPIMediaType(schema=Schema())}


def _operations(item: PathItem) -> list[Operation]:
    found = [getattr(item, method, None) for method in _METHODS]
    return [operation for operation in found if isinstance(operation, Operation)]


def _summarise(operation: Operation) -> None:
    """A docstring's first sentence as the summary (Litestar's default is the function name)."""
    if not operation.description:
        return
    first = operation.description.strip().split("\n\n", 1)[0]
    first = " ".join(first.split())
    end = first.find(". ")
    operation.summary = (first if end < 0 else first[: end + 1]).rstrip(".")


def _type_streams(operation: Operation) -> None:
    """Event streams are text, files are bytes: say so instead of an empty schema."""
    for response in (operation.responses or {}).values():
        content = getattr(response, "content", None) or {}
        for media_type, media in content.items():
            if media_type == _SSE:
                media.schema = Schema(
                    type=OpenAPIType.STRING,
                    description="Server-Sent Events: `id:` the event's seq, `data:` its JSON",
                )
            elif media_type == _BINARY or media_type.startswith(("image/", "video/", "audio/")):
                media.schema = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
