"""Overrides checked against their node's definition (gateway/comfyui/overrides.py)."""

from __future__ import annotations

from gateway.comfyui.nodedef import NodeDef
from gateway.comfyui.overrides import override_problems
from plugins.simulator.nodedefs import NodeRegistry
from plugins.simulator.samples import tiny_workflow

REGISTRY = NodeRegistry(["EmptyImage", "ImageInvert", "SaveImage", "LoadImage"], {}, list)


def problems(**overrides: object) -> list[str]:
    def definition(class_type: str) -> NodeDef | None:
        return REGISTRY.get(class_type)

    return override_problems(tiny_workflow(), overrides, definition)


def test_a_misspelt_input_is_named_with_the_closest_ones() -> None:
    [problem] = problems(**{"Save.filenme_prefix": "x"})
    assert "SaveImage has no input 'filenme_prefix'" in problem
    assert "did you mean 'filename_prefix'?" in problem


def test_an_input_the_class_does_not_have_lists_what_it_has() -> None:
    [problem] = problems(**{"1.colour_space": "srgb"})
    assert "EmptyImage has no input 'colour_space'" in problem and "width" in problem


def test_values_of_the_wrong_type_or_out_of_range_are_refused() -> None:
    assert problems(**{"1.width": "wide"}) == [
        "override '1.width': width takes INT, not str 'wide'"
    ]
    assert problems(**{"1.width": True})  # a bool is no INT, as ComfyUI's check says
    assert problems(**{"1.width": 0}) and "at least" in problems(**{"1.width": 0})[0]
    assert problems(**{"Save.filename_prefix": 3}) == [
        "override 'Save.filename_prefix': filename_prefix takes STRING, not int 3"
    ]


def test_fitting_overrides_links_and_unknown_classes_pass() -> None:
    assert problems(**{"1.width": 128, "Save.filename_prefix": "ok", "2.image": ["1", 0]}) == []
    assert override_problems(tiny_workflow(), {"1.anything": 1}, lambda _: None) == []


def test_an_input_fed_by_a_link_takes_only_a_link() -> None:
    [problem] = problems(**{"Save.images": "x"})
    assert "images takes a link to a node's IMAGE output" in problem
