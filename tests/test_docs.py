"""The documents' references resolve, and nothing is seeded with ``hash()`` (issue 29).

Every relative markdown link and every backticked repository path (``docs/…``, ``bench/…``, ``tests/…``,
``actmerge/…``, ``recipes/…``; a ``file.py::test_name`` names a test that must exist too) in README.md,
docs/*.md and bench/results/PROTOCOL.md names a file or folder of the repository, so a moved document,
script or test cannot leave a dangling reference (``<placeholders>`` are skipped). ``hash()`` of a str is salted per process
(PYTHONHASHSEED), so a seed derived from it changes every run and a failure cannot be reproduced."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "results" / "PROTOCOL.md",
]
PREFIXES = ("docs/", "bench/", "tests/", "actmerge/", "recipes/")
# Files of a baked checkpoint's provenance folder, which is also named actmerge/ (io/output.py's
# PROVENANCE_DIR): the documents describe them, the repository does not hold them.
PROVENANCE_FILES = {"bake.json", "verify.json", "verify-llama.cpp.json", "maps.safetensors", "recipe.yaml"}
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\s]+)`")


def references(text: str) -> list[str]:
    """Relative link targets and backticked repository paths of a markdown text."""
    links = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]
    paths = [t.rstrip(".,:;") for t in CODE.findall(text) if t.startswith(PREFIXES)]
    return [t for t in links if t] + paths


def missing(doc: Path, root: Path = ROOT) -> list[str]:
    out = []
    for ref in references(doc.read_text(encoding="utf-8")):
        head, _, name = ref.partition("/")
        if (head == "actmerge" and name in PROVENANCE_FILES) or "<" in ref:
            continue
        base = root if ref.startswith(PREFIXES) else doc.parent
        ref, _, test = ref.partition("::")
        if test:
            path = base / ref
            if not path.is_file() or f"def {test}(" not in path.read_text(encoding="utf-8"):
                out.append(f"{ref}::{test}")
        elif "*" in ref:
            if not list(base.glob(ref)):
                out.append(ref)
        elif not (base / ref).exists():
            out.append(ref)
    return out


def test_every_document_reference_resolves():
    assert len(DOCUMENTS) >= 2 and (ROOT / "docs" / "design.md").is_file()
    assert {doc.relative_to(ROOT).as_posix(): missing(doc) for doc in DOCUMENTS} == {
        doc.relative_to(ROOT).as_posix(): [] for doc in DOCUMENTS
    }


def test_the_reference_check_reports_a_dangling_reference(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "here.py").write_text("")
    doc = tmp_path / "docs" / "x.md"
    doc.write_text(
        "See [the design](design.md), [here](../bench/here.py#L3), [web](https://example.com) and\n"
        "`bench/here.py`, `bench/gone.py`, `tests/test_*.py`, `actmerge/bake.json`, `pip install x`,\n"
        "`bench/here.py::test_gone`, `bench/<name>.py`.\n"
    )
    assert missing(doc, tmp_path) == [
        "design.md",
        "bench/gone.py",
        "tests/test_*.py",
        "bench/here.py::test_gone",
    ]


def test_no_document_cites_a_file_outside_the_repository():
    """The design document lives in docs/design.md; the former out-of-tree DESIGN.md is cited nowhere."""
    cited = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*DOCUMENTS, *_sources(), *(ROOT / "actmerge" / "recipes").glob("*.yaml")]
        if p != Path(__file__).resolve()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "DESIGN.md" in line
    ]
    assert cited == []


def _sources() -> list[Path]:
    return sorted(p for d in ("actmerge", "tests", "bench") for p in (ROOT / d).rglob("*.py"))


def hash_calls(source: str) -> list[int]:
    """Line numbers of calls to the builtin ``hash``."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash"
    ]


def test_nothing_is_seeded_with_the_salted_builtin_hash():
    calls = [
        f"{p.relative_to(ROOT)}:{n}" for p in _sources() for n in hash_calls(p.read_text(encoding="utf-8"))
    ]
    assert calls == []


def test_the_hash_check_finds_a_hash_seed():
    assert hash_calls("import torch\ng = torch.manual_seed(hash('attn_ctx') % 1000)\nh = x.hash(1)\n") == [2]
