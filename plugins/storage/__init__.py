"""Where job outputs are stored: a small protocol and its backends, found by name.

Backend modules (`local`, `nats`) are not imported here: the registry imports a backend only
when it is asked for, so `nats` is not needed to use `local` and a broken third-party backend
cannot stop the others from loading.
"""

from gateway.storage import (
    InvalidContentType,
    InvalidKey,
    NotFound,
    Storage,
    StorageError,
    StorageFull,
    StoredObject,
    UnknownBackend,
    guess_content_type,
    validate_key,
)
from plugins.storage.registry import available_backends, create_storage, load_backend

__all__ = [
    "InvalidContentType",
    "InvalidKey",
    "NotFound",
    "Storage",
    "StorageError",
    "StorageFull",
    "StoredObject",
    "UnknownBackend",
    "available_backends",
    "create_storage",
    "guess_content_type",
    "load_backend",
    "validate_key",
]
