"""The layout holds: who may import whom (docs/ARCHITECTURE.md's map), no import circles, and
no module so long that it needs a reason it does not give.

The import graph is read from the source with `ast`, so an import inside a function counts as
much as one at the top, and `if TYPE_CHECKING:` imports count too: a circle hidden behind one is
still a circle for the reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "plugins", "sdk")

FOUNDATIONS = ("gateway.settings", "gateway.lifecycle", "gateway.files")
SHARED = ("gateway.bus", "gateway.comfyui", "gateway.storage", *FOUNDATIONS)
EVERYTHING = PACKAGES
LOG_SINK_CLIENT = ("gateway.logsink.client", "gateway.logsink.messages")

# Each package, and what it may import besides itself (a module name or a package prefix).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    # The composition root: it starts adapters and simulators inside `up`.
    "gateway.app": EVERYTHING,
    "gateway.api": (
        *SHARED,
        "gateway.balancer",
        "gateway.logsink.client",
        "gateway.logsink.messages",
        "gateway.webhooks",
    ),
    "gateway.balancer": (*SHARED, "gateway.logsink.paths", "gateway.webhooks"),
    "gateway.webhooks": SHARED,
    "gateway.logsink": SHARED,
    "gateway.bus": FOUNDATIONS,
    "gateway.comfyui": FOUNDATIONS,
    "gateway.storage": (),
    "gateway.settings": (),
    "gateway.lifecycle": (),
    "gateway.files": (),
    "gateway": (),  # the package itself; every module of it is in a package above
    "plugins": (),
    "plugins.comfyui": (*SHARED, "plugins.storage.registry"),
    "plugins.simulator": SHARED,
    "plugins.storage": SHARED,
    "sdk": ("gateway.bus", "gateway.api.schemas"),
}
LONG_MODULE_LINES = 450
LONG_MODULE_REASON = "Why this module is long:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if ".venv" not in path.parts
    }


def _imports(module: str, path: Path, modules: set[str]) -> Iterator[str]:
    """The project modules `module` imports; `from pkg import sub` names the submodule."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield submodule if submodule in modules else source


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    return {
        module: {name for name in _imports(module, path, modules) if name != module}
        for module, path in sources.items()
    }


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _package_of(module: str) -> str:
    matches = [
        prefix
        for prefix in MAY_IMPORT
        if _within(module, prefix) and (prefix not in ("gateway", "plugins") or module == prefix)
    ]
    assert matches, f"{module} belongs to no package of the map: add it to MAY_IMPORT"
    return max(matches, key=len)


def test_every_package_imports_only_what_the_map_allows() -> None:
    wrong = []
    for module, imported in sorted(_graph().items()):
        package = _package_of(module)
        allowed = (package, *MAY_IMPORT[package])
        wrong += [
            f"{module} imports {name}"
            for name in sorted(imported)
            if not any(_within(name, prefix) for prefix in allowed)
        ]
    assert not wrong, "imports against docs/ARCHITECTURE.md's map:\n" + "\n".join(wrong)


def test_only_the_composition_root_imports_plugins_from_gateway() -> None:
    importers = {
        module
        for module, imported in _graph().items()
        if module.startswith("gateway.") and any(_within(n, "plugins") for n in imported)
    }
    assert importers, "the composition root starts adapters: it must import plugins"
    assert all(_within(module, "gateway.app") for module in importers), sorted(importers)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert not _circles(_graph())


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_long_module_says_why() -> None:
    unexplained = []
    for path in _sources().values():
        text = path.read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG_MODULE_LINES and LONG_MODULE_REASON not in docstring:
            unexplained.append(str(path.relative_to(ROOT)))
    assert not unexplained, (
        f"over {LONG_MODULE_LINES} lines: split each where its responsibilities part, or say "
        f"'{LONG_MODULE_REASON} ...' in its docstring: {unexplained}"
    )
