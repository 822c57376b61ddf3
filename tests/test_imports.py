"""The house's import rules, checked on the package's source (every import, also function-local).

- Stages and the shared core never import ``likeness.build``, ``serve``, ``cli`` or ``nightly``;
  ``build`` never imports ``serve``, ``cli`` or ``nightly``; ``serve`` never imports ``cli`` or
  ``nightly``; ``nightly`` never imports ``cli`` (arrows point down the pipeline only).
- Only ``serve/`` and ``cli/`` import grpc.
- ``backends/protocols.py`` imports no heavy library (torch, onnxruntime, insightface, open_clip,
  diffusers, numpy at run time), so the core can type against it for free.
- No import circle between the package's modules, counting function-local imports (a circle hidden
  inside a function is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "service" / "likeness"
HEAVY = ("torch", "onnxruntime", "insightface", "open_clip", "diffusers", "transformers", "numpy", "faiss", "cv2")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "pb" not in p.relative_to(PKG).parts}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, under TYPE_CHECKING) for every import in the file, resolved to known modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                type_only.add(id(sub))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # The deepest known module this name refers to (``from likeness.curate import decide``).
            target = name if name in known else None
            if target is None and not name.startswith("likeness"):
                target = name  # a third-party module: keep its name for the grpc / heavy checks
            if target is not None:
                out.append((target, node.lineno, id(node) in type_only))
    return out


MODULES = _modules()
KNOWN = set(MODULES)
GRAPH = {m: _imports(p, KNOWN) for m, p in MODULES.items()}

LAYER = {"build": 1, "serve": 2, "nightly": 3, "cli": 4, "__main__": 4}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER.get(parts[1], 0) if len(parts) > 1 else 0


def test_the_rules_see_the_whole_package():
    # A walker that found nothing would pass every rule below.
    assert {"likeness.curate.decide", "likeness.build.runner", "likeness.serve.servicer", "likeness.cli.main",
            "likeness.backends.protocols", "likeness.layout"} <= KNOWN
    assert any(t == "likeness.build.stages" for t, _, _ in GRAPH["likeness.build.runner"])


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_arrows_point_down_the_pipeline(module):
    bad = [f"{t} (line {line})" for t, line, _ in GRAPH[module]
           if t.startswith("likeness.") and _layer(t) > _layer(module)]
    assert not bad, f"{module} imports a layer above it: {bad}"


def test_only_serve_and_cli_import_grpc():
    bad = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() for t, line, _ in edges
           if (t == "grpc" or t.startswith(("grpc.", "grpc_"))) and _layer(m) not in (LAYER["serve"], LAYER["cli"])]
    assert not bad, bad


def test_protocols_stay_light():
    bad = [f"line {line}: {t}" for t, line, type_only in GRAPH["likeness.backends.protocols"]
           if not type_only and t.split(".")[0] in HEAVY]
    assert not bad, f"backends/protocols.py must not import heavy libraries at run time: {bad}"


def _cycles() -> list[list[str]]:
    edges = {m: sorted({t for t, _, type_only in GRAPH[m] if t in KNOWN and t != m and not type_only}) for m in KNOWN}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(KNOWN):
        if v not in index:
            strong(v)
    return found


def test_no_import_circles():
    assert not _cycles(), f"import circles: {_cycles()}"


def test_the_circle_finder_finds_a_circle():
    GRAPH["likeness.layout"].append(("likeness.build.runner", 0, False))
    try:
        assert any("likeness.layout" in c for c in _cycles())
    finally:
        GRAPH["likeness.layout"].pop()
