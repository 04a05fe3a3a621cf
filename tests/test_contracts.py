"""One module owns each contract: a grep over qprep's own code (its string constants, docstrings
left out) finds the store's paths and file names only in `qprep/store/layout.py`, the failure
codes of the manifest only in `qprep/errors.py`, and no manifest column read by name outside
`qprep/schemas/manifest.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import qprep
from qprep import errors
from qprep.schemas import manifest
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


# Dicts of other contracts whose keys share a manifest column's name: the video settings and the
# processor's kwargs (`size`, `fps`), a data file's records (`id`, `duration`), LongVALE's `meta`
# (`duration`) and ms-swift's images (`path`), the store's attributes (`fingerprint`), the `qprep status`
# report (`path`, `error`, `fingerprint`).
OTHER_CONTRACTS = {"settings", "kwargs", "merged", "video", "values", "overrides", "record", "meta", "image", "attrs",
                   "report", "failure"}


def column_reads(path: Path) -> list[str]:
    """Where a module reads a manifest column by its name: `x["col"]`, `x.get("col")`,
    `table.column("col")`, `table.select([...])`, or an f-string building `<span>_offset|_length`."""
    columns = set(manifest.COLUMNS)

    def named(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and node.value in columns else None

    def receiver(node) -> str:
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            if isinstance(node, ast.Attribute):
                return node.attr
            node = node.value if not isinstance(node, ast.Call) else node.func
        return node.id if isinstance(node, ast.Name) else ""

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        keys, owner = [], ""
        if isinstance(node, ast.Subscript):
            keys, owner = [named(node.slice)], receiver(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and \
                node.func.attr in ("get", "pop", "setdefault", "column", "select", "field", "sort_by"):
            first = node.args[0]
            keys = [named(item) for item in (first.elts if isinstance(first, (ast.List, ast.Tuple)) else [first])]
            owner = receiver(node.func.value)
        elif isinstance(node, ast.JoinedStr):
            tail = "".join(part.value for part in node.values if isinstance(part, ast.Constant))
            keys = [tail] if tail.endswith(("_offset", "_length")) else []
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {key!r}" for key in keys
                  if key and owner not in OTHER_CONTRACTS]
    return found


def test_only_the_manifest_module_reads_manifest_columns_by_name():
    owner = Path(manifest.__file__)
    assert column_reads(owner), "the check must see the manifest module's own reads"
    found = [read for path in sorted(PACKAGE.rglob("*.py")) if path != owner for read in column_reads(path)]
    assert found == []


def test_only_the_dtype_table_lists_dtypes_or_their_storage():
    """One table (qprep/schemas/dtypes.py) says what each dtype is stored as and verified to: no other
    module holds a literal listing two dtype names (a mapping or a choice list) or spells a storage dtype."""
    from qprep.schemas import dtypes

    names = set(dtypes.DTYPE_NAMES)
    storage = {fact.storage for fact in dtypes.DTYPES.values()} - names
    assert storage == {"uint16"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(dtypes.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else \
                node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else []
            listed = {item.value for item in items if isinstance(item, ast.Constant)} & names
            if len(listed) >= 2:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {sorted(listed)}")
        found += [f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}" for line, value in string_constants(path)
                  if value in storage]
    assert found == []


def test_every_package_of_qprep_ships_in_the_wheel():
    """pyproject.toml lists the packages by name (the presets' folder is mapped in): a new subpackage
    left out would install without its modules."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as the dependency pyproject names
        import tomli as tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(PACKAGE.parent).parts) for path in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
