"""The package layers: a lower layer never imports a higher one (nor a sibling of its own rank).

Layers, lowest first (each package's docstring says the same):

    0  dmf, dmf.errors, dmf.config      the foundation
    1  dmf.store, dmf.dist              the store and the storage module; Dask plumbing
    2  dmf.data, dmf.als                raw input -> store; the ALS maths
    3  dmf.model                        the trained model and its uses
    4  dmf.train                        the training loop
    5  dmf.api, dmf.tune, dmf.cli,      what users call
       dmf.__main__

Modules of the foundation may import each other (config uses errors), and so may those of the
top layer (``python -m dmf`` runs the command line). Every import statement counts,
function-local ones included; only imports under ``if TYPE_CHECKING:`` (annotations, never run)
are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DMF = Path(__file__).resolve().parents[1] / "dmf"

LAYERS = {
    "dmf": 0,
    "dmf.errors": 0,
    "dmf.config": 0,
    "dmf.store": 1,
    "dmf.dist": 1,
    "dmf.data": 2,
    "dmf.als": 2,
    "dmf.model": 3,
    "dmf.train": 4,
    "dmf.api": 5,
    "dmf.tune": 5,
    "dmf.cli": 5,
    "dmf.__main__": 5,
}
# Layers whose modules may import each other.
OPEN_LAYERS = {0, 5}


def component(module: str) -> str:
    """The layer component of a dotted module name: ``dmf.model.ids`` -> ``dmf.model``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "dmf"
    return ".".join(parts[:2])


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    for inner in ast.walk(sub):
                        skip.add(id(inner))
    return skip


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported dmf module) for every runtime import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dmf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "dmf":
                found.append((node.lineno, mod))
    return found


def layer_violations(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        src = component(here)
        if src not in LAYERS:
            out.append(f"{path}: package {src} has no layer; add it to LAYERS")
            continue
        for line, mod in imports_of(path, root):
            dst = component(mod)
            if dst == src or mod == "dmf":
                continue  # within a package; `from dmf import __version__`
            if dst not in LAYERS:
                out.append(f"{path}:{line}: imports {mod}, which has no layer")
            elif LAYERS[dst] > LAYERS[src] or (
                LAYERS[dst] == LAYERS[src] and LAYERS[src] not in OPEN_LAYERS
            ):
                out.append(
                    f"{path}:{line}: {src} (layer {LAYERS[src]}) imports {mod} "
                    f"(layer {LAYERS[dst]})"
                )
    return out


def test_lower_layers_never_import_higher_ones():
    assert layer_violations(DMF) == []


def test_every_package_says_what_it_may_import():
    for init in sorted(DMF.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init}: the docstring should say what the package may import"


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("store/x.py", "from dmf.model import Model\n", "dmf.store (layer 1) imports dmf.model"),
        ("als/x.py", "def f():\n    import dmf.data.ingest\n", "imports dmf.data.ingest"),
        ("dist/x.py", "from dmf.store.layout import Store\n", "imports dmf.store.layout"),
        ("model/x.py", "from ..train import loop\n", "imports dmf.train"),
    ],
)
def test_the_check_catches_upward_and_sideways_imports(tmp_path, where, source, expected):
    root = tmp_path / "dmf"
    (root / where).parent.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / where).parent.joinpath("__init__.py").write_text("")
    (root / where).write_text(source)
    found = layer_violations(root)
    assert any(expected in v for v in found), found


def test_annotation_only_imports_are_exempt(tmp_path):
    root = tmp_path / "dmf"
    (root / "store").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "store" / "__init__.py").write_text("")
    (root / "store" / "x.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dmf.model import Model\n"
    )
    assert layer_violations(root) == []
