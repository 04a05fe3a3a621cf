"""One module owns each contract: a grep over qprep's own code (its string constants, docstrings
left out) finds the store's paths and file names only in `qprep/store/layout.py`, and the failure
codes of the manifest only in `qprep/errors.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import qprep
from qprep import errors
from qprep.store import layout

PACKAGE = Path(qprep.__file__).parent


def string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in a module, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def spelled_outside(owner: Path, matches) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == owner:
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}" for line, value in string_constants(path)
                  if matches(value)]
    return found


def test_only_the_store_layout_spells_the_stores_paths_and_file_names():
    names = {layout.LAST_RUN, layout.WEIGHT_DIGESTS, layout.MODEL_SPEC, layout.PRIVATE}
    assert all(names)
    pieces = (f"{layout.SHARDS}/", f"{layout.MANIFEST}/", ".parquet", *names)
    assert spelled_outside(Path(layout.__file__), lambda value: any(piece in value for piece in pieces)) == []


def test_only_the_errors_module_spells_the_failure_codes():
    codes = {errors.WORKER_DIED, errors.TOWER_ERROR, errors.INTERNAL_ERROR}
    codes |= {kind.code for kind in vars(errors).values() if isinstance(kind, type) and hasattr(kind, "code")}
    assert len(codes) > 5
    assert spelled_outside(Path(errors.__file__), lambda value: value in codes) == []
