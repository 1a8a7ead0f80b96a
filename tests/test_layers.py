"""The import layers of the package (docs/architecture.md): an import may only point down or sideways within a
layer, and no module imports itself back through others (a cycle). Read from the source with ``ast``: nothing
is imported, so the test is fast and sees imports inside functions too.

Glossary:
    module      every ``.py`` file under the product's folders, named as installed (``vision/drafter.py`` is
                ``mmspec.vision.drafter``; ``setup.py``'s ``ROOTS`` map the folders)
    edge        ``import a.b`` / ``from a.b import c`` in module m: m -> ``a.b.c`` when that is a module, else
                m -> ``a.b``; imports under ``if TYPE_CHECKING:`` never run and are left out, and so is an
                import of a module's own package (``from mmspec import zoo`` inside ``mmspec.zoo.smollm2``),
                which Python has always finished initialising first
    layer       the number of the longest prefix of ``LAYERS`` naming the module; an edge to a higher layer is
                a violation (the core must never need training code, the zoo, the CLI or the demos)
"""

from __future__ import annotations

import ast
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS: dict[str, str] = runpy.run_path(str(ROOT / "setup.py"), run_name="layout")["ROOTS"]

#: lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mmspec.errors", "mmspec.config", "mmspec.rng", "mmspec.sampling", "mmspec.stats", "mmspec.kernels",
              "mmspec.cpu_packing", "mmspec.truncate")),
    ("verification", ("mmspec.verify",)),
    ("sessions and heads", ("mmspec.cache", "mmspec.guidance", "mmspec.session", "mmspec.heads")),
    ("drafters", ("mmspec.drafters",)),
    ("the loop", ("mmspec.request", "mmspec.engine", "mmspec.chat", "mmspec.calibration")),
    ("public API", ("mmspec",)),
    ("modalities and systems", ("mmspec.vision", "mmspec.image_gen", "mmspec.collaborative", "mmspec.pipeline")),
    ("training and models from packages", ("mmspec.pretrained", "mmspec.distill", "mmspec.data")),
    ("the project's own world", ("mmspec.zoo",)),
    ("fronts", ("mmspec.cli", "mmspec.__main__", "mmspec.serve")),
]
CORE = ("mmspec.errors", "mmspec.config", "mmspec.rng", "mmspec.sampling", "mmspec.stats", "mmspec.kernels",
        "mmspec.cpu_packing", "mmspec.truncate", "mmspec.verify", "mmspec.cache", "mmspec.guidance", "mmspec.session", "mmspec.heads",
        "mmspec.drafters", "mmspec.request", "mmspec.engine", "mmspec.chat", "mmspec.calibration")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((name, *rel))] = path
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported mmspec module, line) for every import statement of ``module`` that runs."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if _is_package(module) else module.rpartition(".")[0]
    skip = _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import mmspec.vision.pruning.base`` etc.
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m)} for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_only_point_down():
    upward = []
    for module in MODULES:
        for target, line in imports_of(module):
            if layer_of(target) > layer_of(module):
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} {module} ({LAYERS[layer_of(module)][0]}) "
                              f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_core_needs_nothing_from_training_zoo_or_fronts():
    """The core's modules (and everything they import, transitively) stay inside the core."""
    edges = graph()
    for module in (m for m in MODULES if m.startswith(CORE)):
        seen, todo = set(), [module]
        while todo:
            m = todo.pop()
            for t in edges[m]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        outside = sorted(t for t in seen if not t.startswith(CORE))
        assert not outside, f"{module} reaches {outside}"


def test_the_package_never_imports_the_repositorys_scripts():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] not in ("benchmarks", "demos", "tests"), f"{module} imports {name}"


# the checker itself, on made-up graphs
@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, []),
])
def test_cycle_finder_on_table_cases(edges, expected):
    assert cycles(edges) == expected
