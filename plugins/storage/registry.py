"""Finding storage backends by name, through the `comfyautomate.storage` entry points.

The two built-in backends are declared in this project's pyproject.toml; a third party adds
one by declaring an entry point in its own package (see README.md), without touching this code.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Final

from gateway.storage import Storage, StorageError, UnknownBackend

ENTRY_POINT_GROUP: Final = "comfyautomate.storage"
DEFAULT_BUCKET: Final = "comfy_outputs"


def _entry_points() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names of the installed storage backends, sorted."""
    return sorted(_entry_points())


def load_backend(name: str, **options: Any) -> Storage:
    """Build the backend called `name` with `options` (its constructor's keyword arguments).

    Raises UnknownBackend, naming the installed backends, when there is none of that name, and
    StorageError when the backend cannot be imported or is not a Storage.
    """
    points = _entry_points()
    point = points.get(name)
    if point is None:
        names = ", ".join(sorted(points)) or "none"
        raise UnknownBackend(f"no storage backend named {name!r}; installed: {names}")
    try:
        factory = point.load()
    except (ImportError, AttributeError) as exc:
        raise StorageError(
            f"storage backend {name!r} ({point.value}) cannot be imported: {exc}"
        ) from exc
    if not callable(factory):
        raise StorageError(f"storage backend {name!r} ({point.value}) is not callable")
    backend = factory(**options)
    if not isinstance(backend, Storage):
        raise StorageError(
            f"storage backend {name!r} ({point.value}) made a {type(backend).__name__}, "
            "not a plugins.storage.Storage"
        )
    return backend


def create_storage(
    name: str = "local",
    *,
    data_dir: Path | str | None = None,
    js: Any = None,
    bucket: str = DEFAULT_BUCKET,
    base_url: str = "",
    **options: Any,
) -> Storage:
    """The backend a deployment's settings ask for.

    `local` stores under `<data_dir>/outputs`; `nats` needs `js`, a JetStream context (or a
    connected client), and uses `bucket`; any other name is loaded by entry point with
    `base_url` and `options`.
    """
    if name == "local":
        if data_dir is None:
            raise StorageError("the local storage backend needs data_dir")
        return load_backend(name, root=Path(data_dir) / "outputs", base_url=base_url, **options)
    if name == "nats":
        if js is None:
            raise StorageError("the nats storage backend needs a JetStream context (js)")
        return load_backend(name, js=js, bucket=bucket, base_url=base_url, **options)
    return load_backend(name, base_url=base_url, **options)
