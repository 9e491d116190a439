"""The comparison itself must catch a changed type, field, value or order."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from transcripts import Normaliser, compare_frames, load


def _frames() -> list[Any]:
    return [e["msg"] for e in load("ws_tiny") if e["kind"] == "ws" and e["frame"] == "text"]


def _check(mutate: Any) -> str | None:
    normalise = Normaliser()
    expected = _frames()
    actual = copy.deepcopy(expected)
    mutate(actual)
    return compare_frames([normalise(f) for f in expected], [normalise(f) for f in actual])


def test_identical_frames_compare_equal() -> None:
    assert _check(lambda frames: None) is None


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda f: f.insert(5, f.pop(6)), id="order"),
        pytest.param(lambda f: f.pop(), id="missing-message"),
        pytest.param(lambda f: f.append(f[0]), id="extra-message"),
        pytest.param(lambda f: f[3].__setitem__("type", "execution_begin"), id="type"),
        pytest.param(lambda f: f[3]["data"].pop("prompt_id"), id="missing-field"),
        pytest.param(lambda f: f[3]["data"].__setitem__("extra", 1), id="extra-field"),
        pytest.param(lambda f: f[6]["data"].__setitem__("node", "2"), id="value"),
        pytest.param(
            lambda f: f[5]["data"]["nodes"]["1"].__setitem__("value", 0), id="int-vs-float"
        ),
    ],
)
def test_any_difference_is_reported(mutate: Any) -> None:
    assert _check(mutate) is not None


def test_volatile_values_are_ignored() -> None:
    def shift(frames: list[Any]) -> None:
        for frame in frames:
            if "timestamp" in frame["data"]:
                frame["data"]["timestamp"] += 12345

    assert _check(shift) is None
