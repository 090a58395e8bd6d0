"""The package's shape: every module named in docs/architecture.md, no import cycle (function-level
imports count), no module over 450 lines. AST only: fast, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "actmerge"
MAX_LINES = 450


def modules(root: Path = PKG) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (``from . import x`` → x)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
                targets = [n for n in names if n in mods] or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(modules())) == []


def test_the_cycle_check_finds_one(tmp_path):
    pkg = tmp_path / "actmerge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    assert cycles(import_graph(modules(pkg))) == [["actmerge.a", "actmerge.b", "actmerge.sub.c"]]


def test_no_module_is_over_the_size_limit():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_every_module_is_on_the_module_map():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        str(p.relative_to(PKG))
        for p in modules().values()
        if f"`{p.relative_to(PKG).as_posix()}`" not in text
    ]
    assert missing == []


MAX_PARAMETERS = 10
# library functions still over the limit, each named: this list only shrinks (a new wide function
# fails). Empty: every library function takes at most ten.
WIDE_ALLOWED: set[str] = set()


def wide_functions(root: Path = PKG, limit: int = MAX_PARAMETERS) -> dict[str, int]:
    """``module.function`` (methods: ``module.Class.method``) → its parameter count, for every function
    outside ``cli/`` with more than ``limit`` parameters (positional and keyword-only; not self, cls,
    *args or **kwargs)."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                a = child.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > limit:
                    found[prefix + child.name] = len(names)
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    for m, p in modules(root).items():
        if m.split(".")[1:2] != ["cli"]:
            visit(ast.parse(p.read_text(encoding="utf-8")), m.removeprefix(f"{root.name}.") + ".")
    return found


def test_no_library_function_has_more_than_ten_parameters():
    wide = wide_functions()
    assert {f: n for f, n in wide.items() if f not in WIDE_ALLOWED} == {}
    assert WIDE_ALLOWED - set(wide) == set()  # converted: take it off the list


def test_the_parameter_check_finds_one(tmp_path):
    pkg = tmp_path / "actmerge"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    eleven = ", ".join(f"a{i}" for i in range(10))
    (pkg / "a.py").write_text(
        f"def f(self, {eleven}, *args, b=1, **kw): ...\nclass C:\n    def g(self, {eleven}): ...\n"
    )
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "x.py").write_text(f"def h({eleven}, b): ...\n")
    assert wide_functions(pkg) == {"a.f": 11}


def test_evaluation_writes_only_through_the_output_helper():
    """Report directories are filled in one place, ``evaluation/write.py``, inside ``io.output``'s
    ``write_report_dir`` (atomic, sources never written over, ``--force``); the other evaluation modules
    write only into the temporary directory they are handed (``Report.save``, ``TuneResult.save``, the
    figures), and nothing else in the package calls those writers."""
    callers: dict[str, set[str]] = {}
    writes: set[str] = set()
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "ax":
                continue  # matplotlib's Axes.plot
            if name in ("write_report_dir", "plot", "plot_tradeoff", "eval_dir", "tune_dir"):
                callers.setdefault(name, set()).add(m)
            if m.startswith("actmerge.evaluation") and name in (
                "write_text",
                "write_bytes",
                "savefig",
                "open",
            ):
                writes.add(f"{m}:{name}")
    write = "actmerge.evaluation.write"
    assert callers == {
        "write_report_dir": {write},
        "plot": {write},
        "plot_tradeoff": {write},
        "eval_dir": {"actmerge.pipeline"},
        "tune_dir": {"actmerge.evaluation.tune"},
    }
    assert writes == {"actmerge.evaluation.records:write_text", "actmerge.evaluation.plot:savefig"}


# ---- the model kinds: one interface, chosen once (actmerge/kinds/) ------------------------------
KINDS_DIR = "kinds"
KIND_NAMES = {"llm", "pipeline"}  # BakeInfo.kind: what a branch on the model kind compares with
# the jobs each kind does its own way: defined per kind inside kinds/, at most once outside it
PER_KIND = [
    "attach", "steer", "affine_fn", "compare", "run_fresh", "shift_home", "site_for_key", "split_key",
    "recipe_sites", "capabilities", "collect", "resolve", "plan", "_need",
]  # fmt: skip


def kind_branches(root: Path = PKG) -> list[str]:
    """``file:line`` of every branch on the model kind outside ``kinds/``: a comparison of anything with
    a kind's name (``kind == "llm"``, ``info.kind != "pipeline"``, ``x in ("llm", …)``), or an
    ``isinstance`` test against ``PipelineSource``."""
    found = []
    for p in sorted(root.rglob("*.py")):
        if p.relative_to(root).parts[0] == KINDS_DIR:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            hit = False
            if isinstance(node, ast.Compare):
                consts = [
                    e.value
                    for side in [node.left, *node.comparators]
                    for e in ([side] if not isinstance(side, ast.Tuple | ast.List | ast.Set) else side.elts)
                    if isinstance(e, ast.Constant)
                ]
                hit = any(c in KIND_NAMES for c in consts)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
            ):
                hit = "PipelineSource" in ast.unparse(node.args[1]) if len(node.args) == 2 else False
            if hit:
                found.append(f"{p.relative_to(root).as_posix()}:{node.lineno}")
    return found


def definitions_outside_kinds(root: Path = PKG) -> dict[str, list[str]]:
    """Per-kind job name → the modules outside ``kinds/`` that define it at module level."""
    found: dict[str, list[str]] = {n: [] for n in PER_KIND}
    for p in sorted(root.rglob("*.py")):
        if p.relative_to(root).parts[0] == KINDS_DIR:
            continue
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in found:
                found[node.name].append(p.relative_to(root).as_posix())
    return found


def test_no_branch_on_the_model_kind_outside_kinds():
    """The verbs call the kind's interface (``kinds.base.ModelKind``); only ``kinds/`` knows the kinds."""
    assert kind_branches() == []


def test_no_per_kind_job_is_defined_twice_outside_kinds():
    twice = {n: where for n, where in definitions_outside_kinds().items() if len(where) > 1}
    assert twice == {}


def test_the_interface_names_the_per_kind_jobs_and_both_kinds_implement_it():
    from actmerge.kinds.base import ModelKind
    from actmerge.kinds.registry import KINDS

    abstract = ModelKind.__abstractmethods__
    assert {"resolve", "recipe_sites", "plan", "steer", "capabilities", "fit", "verify", "write"} <= abstract
    assert set(KINDS) == KIND_NAMES
    for kind in KINDS.values():  # instantiated: every abstract method implemented
        assert isinstance(kind, ModelKind) and not type(kind).__abstractmethods__


def test_the_kind_checks_find_a_branch_and_a_second_definition(tmp_path):
    pkg = tmp_path / "actmerge"
    (pkg / KINDS_DIR).mkdir(parents=True)
    (pkg / "verbs.py").write_text(
        "def bake(job, src, row):\n"
        "    if job.kind == 'pipeline' or isinstance(src, (str, PipelineSource)):\n"
        "        return row.kind == 'baked' or job.kind in ('llm',)\n"
    )
    (pkg / "a.py").write_text("def plan(): ...\ndef steer(): ...\n")
    (pkg / "b.py").write_text("def plan(): ...\nclass C:\n    def steer(self): ...\n")
    (pkg / KINDS_DIR / "x.py").write_text("def steer(): ...\nif kind == 'llm': pass\n")
    assert kind_branches(pkg) == ["verbs.py:2", "verbs.py:2", "verbs.py:3"]
    where = definitions_outside_kinds(pkg)
    assert where["plan"] == ["a.py", "b.py"] and where["steer"] == ["a.py"]
