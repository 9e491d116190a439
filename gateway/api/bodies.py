"""How deeply a JSON request body may nest, judged from its bytes before any decoder reads it.

Decoders recurse once per level (msgspec gives up with a RecursionError near a thousand), and so
does whatever walks the decoded value afterwards: copies, validation, encoding for the bus. A
body nested deeper than any real request is refused with a 400 first, on every route that
reads JSON: the REST routes through `reject_deep_json`, installed for the whole app (the API's
error shape), ComfyUI's routes through a hook of their own that answers in ComfyUI's shape.
"""

from __future__ import annotations

import re
from typing import Any, Final

from litestar import Request

from gateway.api.errors import ApiError

# Levels of arrays and objects inside each other. A REST submission's workflow inputs sit at
# level 5; the workflow itself may nest 64 levels (gateway.comfyui.workflow.MAX_DEPTH).
MAX_JSON_DEPTH: Final = 100
# Strings, escapes included: brackets inside them are text, not nesting.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_NOT_A_BRACKET: Final = bytes(set(range(256)) - set(b"[]{}"))
_NO_BODY: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def nests_deeper(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` holds arrays and objects more than `limit` levels deep.

    Without recursion, and in passes over bytes rather than a loop per byte: with strings
    dropped and only brackets kept, each pass removes the innermost pairs, so a pair left after
    `limit` passes is deeper than `limit`. Brackets that are never closed count as deep once
    there are more than `limit` of them (a decoder recurses through them before it finds out).
    Text that is not JSON may be judged either way; its decoder refuses it then.
    """
    brackets = _STRING.sub(b"", raw).translate(_SQUARE, _NOT_A_BRACKET)
    if brackets.count(b"[") <= limit:
        return False
    for _ in range(limit):
        inner_removed = brackets.replace(b"[]", b"")
        if len(inner_removed) == len(brackets):
            break
        brackets = inner_removed
    first_open = brackets.find(b"[")
    pair_left = first_open != -1 and brackets.rfind(b"]") > first_open
    return pair_left or brackets.count(b"[") > limit


async def body_nests_too_deeply(request: Request[Any, Any, Any]) -> bool:
    """Whether the request carries a body that would be read as JSON and nests too deeply.

    Form uploads are not JSON; ComfyUI's routes read any other body as JSON whatever its
    declared type (scripts post JSON as form-urlencoded), so every other body is judged. The
    body is read once: Litestar keeps it for the handler.
    """
    if request.method in _NO_BODY:
        return False
    if request.content_type[0] == "multipart/form-data":
        return False
    return nests_deeper(await request.body())


def too_deep_message() -> str:
    return (
        f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
        "no request needs that many"
    )


async def reject_deep_json(request: Request[Any, Any, Any]) -> None:
    """Before every handler: a 400 `invalid_request` for a body nested too deeply."""
    if await body_nests_too_deeply(request):
        raise ApiError(
            400, "invalid_request", too_deep_message(), {"max_json_depth": MAX_JSON_DEPTH}
        )
