"""`/images/{key}`: stream a stored output from whichever storage backend is configured."""

from __future__ import annotations

import math
import re
import time
from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath
from litestar.response import Stream

from gateway.api.auth import caller_of
from gateway.api.errors import ApiError, error_responses
from gateway.api.native.uploads import UPLOADS
from gateway.api.owners import owns_key
from gateway.api.served import how_to_serve
from gateway.api.services import ServicesDep
from gateway.api.signing import IMAGES_TEMPLATE, is_signed, signer_of
from gateway.storage import InvalidKey, NotFound, Storage, StoredObject

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The [start, end) of a single-range `Range` header; None when it asks for everything.

    Raises ApiError 416 when the range cannot be satisfied; several ranges in one header are
    answered with the whole object, which RFC 9110 allows.
    """
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise ApiError(
                416, "range_not_satisfiable", f"empty suffix range of a {size}-byte object"
            )
        return max(0, size - length), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise ApiError(416, "range_not_satisfiable", f"{header} is outside a {size}-byte object")
    return start, end


@get(
    IMAGES_TEMPLATE,
    tags=["images"],
    responses=error_responses(403, 404, 416, 503),
)
async def image(
    key: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
) -> Response[Any]:
    """A stored output, with its content type; `Range` requests are answered with 206.

    With `expires` and `sig` (a result's signed URL) no API key is needed; a wrong, tampered
    or expired signature is a 403.
    """
    storage = services.storage
    if storage is None:
        raise ApiError(503, "no_storage", "no storage backend is configured")
    key = key.lstrip("/")
    # An output of another caller's job answers as if nothing were there, unless the URL is
    # signed: then the signature alone decides (403 when it is not valid, or expired).
    signed = is_signed(request)
    if signed:
        params = request.query_params
        expires = signer_of(request).check(key, params.get("expires"), params.get("sig"))
    # Uploads through ComfyUI's API are served by /view, to their caller alone.
    if key.split("/", 1)[0] == UPLOADS or (
        not signed and not await owns_key(services, caller_of(request), key)
    ):
        raise ApiError(404, "not_found", f"nothing is stored under {key!r}")
    try:
        stored = await storage.stat(key)
    except InvalidKey as exc:
        raise ApiError(400, "invalid_key", str(exc)) from None
    except NotFound:
        raise ApiError(404, "not_found", f"nothing is stored under {key!r}") from None
    # An output never changes, but it is one caller's: a shared cache must not keep it, and
    # a browser not beyond its URL's expiry.
    max_age = max(0, math.floor(expires - time.time())) if signed else 31536000
    headers = {"Cache-Control": f"private, max-age={max_age}, immutable", "Vary": "Authorization"}
    return await stream_stored(storage, stored, request, headers)


async def stream_stored(
    storage: Storage,
    stored: StoredObject,
    request: Request[Any, Any, Any],
    headers: dict[str, str],
) -> Response[Any]:
    """A stored object as the response body: whole, or the range the request asks for (206).

    Its type and the headers that keep a browser safe from it are `served.how_to_serve`'s.
    """
    key = stored.key
    media_type, safety = await how_to_serve(storage, stored)
    headers = {**headers, **safety, "Accept-Ranges": "bytes"}
    span = parse_range(request.headers.get("range", ""), stored.size)
    if span is None:
        headers["Content-Length"] = str(stored.size)
        return Stream(storage.open(key), media_type=media_type, headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{stored.size}"
    headers["Content-Length"] = str(end - start)
    return Stream(
        storage.open(key, start=start, end=end),
        media_type=media_type,
        headers=headers,
        status_code=206,
    )
