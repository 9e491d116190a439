"""The shared key validator and content-type table, without any backend."""

from __future__ import annotations

import pytest

from gateway.storage import (
    InvalidKey,
    check_content_type,
    guess_content_type,
    validate_key,
)


@pytest.mark.parametrize(
    "key",
    [
        "job1/out.png",
        "a",
        "a/b/c/d.mp4",
        "job/ComfyUI_00001_.png",
        "job/名前 with spaces (2).webp",
        "job/dots..png",
        "job/a..b",
        "x" * 255,
        "/".join(["y" * 200] * 5),
    ],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("..", "'..'"),
        ("a/..", "'..'"),
        ("C:\\x", "backslash"),
        ("//x", "absolute"),
        ("a/\u0085", "control"),  # NEL, a C1 control
        ("a/\ud800", "control"),  # a lone surrogate cannot be a file name
        ("/".join(["y" * 250] * 5), "too long"),
    ],
)
def test_invalid_keys(key: str, problem: str) -> None:
    with pytest.raises(InvalidKey, match=problem):
        validate_key(key)


def test_non_string_key() -> None:
    with pytest.raises(InvalidKey, match="must be a string"):
        validate_key(b"a/b")  # type: ignore[arg-type]


def test_guess_is_the_same_everywhere() -> None:
    assert guess_content_type("j/a.png") == "image/png"
    assert guess_content_type("j/A.PNG") == "image/png"
    assert guess_content_type("j/a.glb") == "model/gltf-binary"
    assert guess_content_type("j/a.flac") == "audio/flac"
    assert guess_content_type("j/.png") == "application/octet-stream"
    assert guess_content_type("j/a") == "application/octet-stream"


def test_content_type_check() -> None:
    assert check_content_type("image/svg+xml") == "image/svg+xml"
    assert check_content_type("text/plain; charset=utf-8") == "text/plain; charset=utf-8"
