"""The layout keeps its promises (docs/design.md, "Map"): read from every import in shards/ and pipeline/,
at the top of a module or inside a function, no module imports one of a higher layer, and no import circle
exists anywhere. A layer may import any layer below it and its own modules; `shards` never imports
`pipeline`. The graph is built with `ast` from the files, not by importing them."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module belongs to the last (longest) prefix that matches it
LAYERS = [
    ["shards", "shards.errors", "shards.regular_files", "shards.progress"],
    ["shards.store"],
    ["shards.command_line"],
    ["shards.format"],
    ["shards.read"],
    ["shards.build", "shards.check"],
    ["shards.cli", "shards.__main__", "shards.reader"],
    ["pipeline.errors", "pipeline.config"],
    ["pipeline.plugin", "pipeline.plugins", "pipeline.grids"],
    ["pipeline.engine", "pipeline.data"],
    ["pipeline.checkpoints"],
    ["pipeline.evaluation", "pipeline.model"],
    ["pipeline.training"],
    ["pipeline", "pipeline.commands", "pipeline.train", "pipeline.launch", "pipeline.cli"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for root in ("shards", "pipeline") for path in (REPO / root).rglob("*.py")}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports (a `from package import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {imported for imported in found if imported in known and imported != name}


def layer_of(name: str) -> int:
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})"
        for name, imported_names in graph().items()
        for imported in sorted(imported_names)
        if layer_of(imported) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_shards_never_imports_pipeline() -> None:
    crossing = [(name, sorted(i for i in imported if i.startswith("pipeline"))) for name, imported in graph().items()]
    assert not [(name, imported) for name, imported in crossing if name.startswith("shards") and imported]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_checks_find_what_they_look_for() -> None:
    """The circle finder and the layer map on a made-up graph: a circle of three, and an upward import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("shards.format.manifest") < layer_of("shards.read.reader") < layer_of("pipeline.training.trainer")
    assert layer_of("shards.reader") > layer_of("shards.read.reader")  # the README's re-export sits on top
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


@pytest.mark.parametrize("root", ["shards", "pipeline"])
def test_no_source_file_over_400_lines(root: str) -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in (REPO / root).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_the_readmes_import_path_of_the_readers_stays() -> None:
    """docs/shards.md shows `from shards.reader import open_split, webdataset`: a re-export, the same objects."""
    from shards import reader
    from shards.read import reader as read_reader

    assert (reader.open_split, reader.webdataset) == (read_reader.open_split, read_reader.webdataset)
