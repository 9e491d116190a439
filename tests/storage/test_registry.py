"""Backends found by name through the `comfyautomate.storage` entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from gateway.storage import StorageError, UnknownBackend
from plugins.storage import registry
from plugins.storage.local import LocalStorage
from plugins.storage.nats import NatsStorage
from plugins.storage.registry import (
    available_backends,
    create_storage,
    load_backend,
)


def test_both_backends_are_declared() -> None:
    assert {"local", "nats"} <= set(available_backends())


def test_load_local(tmp_path: Path) -> None:
    storage = load_backend("local", root=tmp_path / "out", base_url="http://h")
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "out").resolve()
    assert storage.url("j/a.png") == "http://h/images/j/a.png"


async def test_load_nats(js: JetStreamContext) -> None:
    storage = load_backend("nats", js=js, bucket="comfy_outputs")
    assert isinstance(storage, NatsStorage)
    with pytest.raises(StorageError):
        await storage.stat("job1/nothing.png")


def test_unknown_name_lists_the_installed_ones() -> None:
    with pytest.raises(UnknownBackend, match=r"no storage backend named 's3'.*local.*nats"):
        load_backend("s3")


def test_create_storage_local(tmp_path: Path) -> None:
    storage = create_storage("local", data_dir=tmp_path, base_url="http://gw/")
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "outputs").resolve()
    assert storage.url("j/a.png") == "http://gw/images/j/a.png"


def test_create_storage_nats(js: JetStreamContext) -> None:
    storage = create_storage("nats", js=js, bucket="comfy_outputs")
    assert isinstance(storage, NatsStorage)
    assert storage.bucket == "comfy_outputs"


def test_create_storage_needs_its_ground() -> None:
    with pytest.raises(StorageError, match="data_dir"):
        create_storage("local")
    with pytest.raises(StorageError, match="JetStream"):
        create_storage("nats")


def _with_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    points = [
        EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)
        for name, value in targets.items()
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: points)


def test_third_party_backend_by_entry_point(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What a third party's pyproject declares: any name, pointing at a Storage subclass.
    _with_entry_points(monkeypatch, disk2="plugins.storage.local:LocalStorage")
    assert available_backends() == ["disk2"]
    storage = create_storage("disk2", root=tmp_path / "x")
    assert isinstance(storage, LocalStorage)


def test_broken_backends_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_entry_points(
        monkeypatch, missing="no_such_module_xyz:Backend", wrong="pathlib:PurePosixPath"
    )
    with pytest.raises(StorageError, match=r"'missing'.*cannot be imported"):
        load_backend("missing")
    with pytest.raises(StorageError, match=r"'wrong'.*not a plugins\.storage\.Storage"):
        load_backend("wrong")
