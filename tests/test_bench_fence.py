"""The fence around bench/ and the package's module boundaries, read from the source (AST, no imports).

- No bench script and no actmerge module imports another module's private name (``from X import _y``,
  or ``X._y`` on a name bound by an import).
- No bench script reads a private attribute of an object (``recipe._base_dir``).
- No ``sys.path`` edits in bench/: scripts run as ``python bench/X.py`` (bench/ is then on the path, so
  ``import lab`` works) and use the installed actmerge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = sorted((ROOT / "bench").glob("*.py"))
PACKAGE = sorted((ROOT / "actmerge").rglob("*.py"))

# Private imports the package still has (file, name): none. An entry that no longer occurs fails
# test_known_private_imports_are_current, so this list only shrinks; a new one fails
# test_package_imports_no_new_private_names (make the name public instead).
KNOWN_PACKAGE: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every private name this file takes from another module."""
    tree = ast.parse(path.read_text(), str(path))
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, alias.name))
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):  # actmerge.recipe._x: the root name is the import
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                found.append((node.lineno, node.attr))
    return sorted(found)


def private_attributes(path: Path) -> list[tuple[int, str]]:
    """(line, expression) of every private attribute read on something other than ``self``/``cls``
    (bench scripts define no classes of the library's: ``recipe._base_dir`` is reaching in)."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted(
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _private(node.attr)
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    )


def sys_path_edits(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_bench_imports_no_private_names():
    bad = [f"{_rel(p)}:{line}: {name}" for p in BENCH for line, name in private_imports(p)]
    assert not bad, "bench/ imports private names (use a public call, or bench/lab.py):\n" + "\n".join(bad)


def test_bench_reaches_into_no_object():
    bad = [f"{_rel(p)}:{line}: {expr}" for p in BENCH for line, expr in private_attributes(p)]
    assert not bad, "bench/ reads private attributes (use a public accessor):\n" + "\n".join(bad)


def test_bench_leaves_sys_path_alone():
    bad = [f"{_rel(p)}:{line}" for p in BENCH for line in sys_path_edits(p)]
    assert not bad, "sys.path edits in bench/ (scripts run as `python bench/X.py`):\n" + "\n".join(bad)


def test_bench_has_its_lab():
    assert (ROOT / "bench" / "lab.py").is_file()
    assert len(BENCH) > 10  # the glob found the scripts


def test_package_imports_no_new_private_names():
    found = {(_rel(p), name): line for p in PACKAGE for line, name in private_imports(p)}
    new = sorted(f"{f}:{line}: {name}" for (f, name), line in found.items() if (f, name) not in KNOWN_PACKAGE)
    assert not new, "private names imported across modules (make them public):\n" + "\n".join(new)


def test_known_private_imports_are_current():
    found = {(_rel(p), name) for p in PACKAGE for _line, name in private_imports(p)}
    stale = sorted(KNOWN_PACKAGE - found)
    assert not stale, f"fixed: remove from KNOWN_PACKAGE in {Path(__file__).name}: {stale}"


def test_the_checks_see_what_they_look_for(tmp_path):
    f = tmp_path / "x.py"
    f.write_text(
        "import sys\nimport actmerge.recipe\nfrom actmerge import tune\nfrom a import _b, c\n"
        "sys.path.insert(0, '.')\nr._base_dir = 1\ntune._search()\nactmerge.recipe._x\nself._y\n"
    )
    assert private_imports(f) == [(4, "_b"), (7, "_search"), (8, "_x")]
    assert sys_path_edits(f) == [5]
    assert [e for _line, e in private_attributes(f)] == ["r._base_dir", "tune._search", "actmerge.recipe._x"]
