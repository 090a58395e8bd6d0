"""Split hygiene (issue 29): every shipped text file has a role per recipe (fit / tune / eval), read from
the recipes' own fields plus actmerge/recipes/data/MANIFEST.yaml for the files no recipe names, and no
evaluation line is equal or near to a line of any fitting or tuning file of any recipe.

Equal: the same after case, punctuation and whitespace are normalised away. Near: difflib's ratio of
the normalised lines >= 0.9, for lines of >= 25 characters. Fit-vs-tune overlaps are reported as
warnings, not failures."""

from __future__ import annotations

import ast
import re
import shutil
import warnings
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import yaml

from actmerge.evaluation.settings import NEUTRAL_TEXT
from actmerge.kinds.diffusers.recipe import DiffusionRecipe
from actmerge.recipe import read_sentences

PACKAGE = Path(__file__).resolve().parents[1] / "actmerge"
MANIFEST = Path("recipes") / "data" / "MANIFEST.yaml"  # relative to the package
FIELD_ROLES = {
    "source": "fit",
    "target": "fit",
    "chat_requests": "fit",
    "tune_prompts": "tune",
    "tune_neutral": "tune",
    "eval_prompts": "eval",
    "eval_prompts_hard": "eval",
    "neutral_text": "eval",
}
NOT_SPLITS = {"keywords"}  # the concept metric's word list
ROLES = {"fit", "tune", "eval"}
NEAR = 0.9
NEAR_MIN_CHARS = 25


@dataclass(frozen=True)
class Line:
    file: str  # relative to the package
    number: int  # 1-based line number in the file
    text: str
    norm: str


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def read_lines(package: Path, rel: str) -> list[Line]:
    """The sentences the loaders read (blank lines and '#' comments skipped), with their line numbers."""
    lines = (package / rel).read_text(encoding="utf-8").splitlines()
    return [
        Line(rel, i, ln.strip(), normalise(ln))
        for i, ln in enumerate(lines, 1)
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def file_roles(package: Path) -> tuple[dict[str, set[tuple[str, str]]], list[str]]:
    """{file relative to the package: {(recipe, role)}} and the problems met on the way."""
    package = package.resolve()
    recipes = package / "recipes"
    roles: dict[str, set[tuple[str, str]]] = {}
    problems: list[str] = []

    def rel(path: Path) -> str | None:
        path = path.resolve()
        if not path.is_file():
            problems.append(f"{path} does not exist")
            return None
        return path.relative_to(package).as_posix()

    names = sorted(p.stem for p in recipes.glob("*.yaml"))
    words: set[str] = set()
    for name in names:
        spec = yaml.safe_load((recipes / f"{name}.yaml").read_text(encoding="utf-8"))
        for field, role in FIELD_ROLES.items():
            if spec.get(field) and (f := rel(recipes / spec[field])):
                roles.setdefault(f, set()).add((name, role))
        if spec.get("eval_prompts") and not spec.get("neutral_text"):  # `actmerge eval`'s perplexity text
            roles.setdefault(NEUTRAL_TEXT.relative_to(PACKAGE).as_posix(), set()).add((name, "eval"))
        if spec.get("keywords") and (f := rel(recipes / spec["keywords"])):
            words.add(f)
    named = set(roles)
    manifest = package / MANIFEST
    for entry, per_recipe in (yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}).items():
        f = rel(manifest.parent / entry)
        if f is None:
            continue
        if f in named:
            problems.append(f"{MANIFEST}: {entry} is named by a recipe already; take it out of the manifest")
        for name, role in per_recipe.items():
            if name not in names or role not in ROLES:
                problems.append(f"{MANIFEST}: {entry}: {name}: {role} (recipes: {names}; roles: {ROLES})")
            roles.setdefault(f, set()).add((name, role))
    for path in sorted([*package.glob("recipes/data/**/*"), *package.glob("data/**/*")]):
        f = path.relative_to(package).as_posix()
        if path.suffix in (".txt", ".jsonl") and f not in roles and f not in words:
            problems.append(f"{f} has no role: name it in a recipe or give it one in {MANIFEST}")
    for f, pairs in sorted(roles.items()):
        kinds = {role for _, role in pairs}
        if "eval" in kinds and kinds & {"fit", "tune"}:
            problems.append(f"{f} is both eval and fit/tune: {sorted(pairs)}")
    return roles, problems


def near_lines(queries: list[Line], others: list[Line]) -> list[tuple[Line, Line, float]]:
    """Every (query, other, ratio) whose normalised lines are equal (ratio 1.0) or, both of at least
    NEAR_MIN_CHARS characters, have difflib ratio >= NEAR. Lines of the same file are not compared."""
    exact: dict[str, list[Line]] = {}
    for o in others:
        exact.setdefault(o.norm, []).append(o)
    long = [o for o in others if len(o.norm) >= NEAR_MIN_CHARS]
    vocab = {c: i for i, c in enumerate(sorted({c for line in long + queries for c in line.norm}))}

    def counts(text: str) -> np.ndarray:
        row = np.zeros(len(vocab), np.int32)
        np.add.at(row, [vocab[c] for c in text], 1)
        return row

    table = np.stack([counts(o.norm) for o in long]) if long else np.zeros((0, len(vocab)), np.int32)
    lengths = np.array([len(o.norm) for o in long])
    found = []
    for q in queries:
        hits = {id(o): (o, 1.0) for o in exact.get(q.norm, []) if o.file != q.file}
        if len(q.norm) >= NEAR_MIN_CHARS and long:
            # difflib's quick_ratio (shared characters as multisets), vectorised: an upper bound on ratio
            bound = 2 * np.minimum(table, counts(q.norm)).sum(1) / (lengths + len(q.norm))
            matcher = SequenceMatcher(None, autojunk=False)
            matcher.set_seq2(q.norm)
            for j in np.flatnonzero(bound >= NEAR):
                o = long[j]
                if o.file == q.file or id(o) in hits:
                    continue
                matcher.set_seq1(o.norm)
                if (r := matcher.ratio()) >= NEAR:
                    hits[id(o)] = (o, r)
        found += [(q, o, r) for o, r in hits.values()]
    return found


def lines_by_role(package: Path, roles: dict[str, set[tuple[str, str]]], kinds: set[str]) -> list[Line]:
    return [
        line
        for f, pairs in sorted(roles.items())
        if {role for _, role in pairs} & kinds
        for line in read_lines(package, f)
    ]


def describe(q: Line, o: Line, r: float, roles: dict[str, set[tuple[str, str]]]) -> str:
    how = "equals" if r == 1.0 and q.norm == o.norm else f"is {r:.2f} close to"
    role = ", ".join(f"{n}: {k}" for n, k in sorted(roles[o.file]))
    return f"{q.file}:{q.number} {how} {o.file}:{o.number} ({role}): {q.text!r} ~ {o.text!r}"


def split_problems(package: Path) -> list[str]:
    """Everything wrong with the splits under ``package`` (a copy of actmerge/ with recipes/ and data/)."""
    roles, problems = file_roles(package)
    evals = lines_by_role(package, roles, {"eval"})
    fit_tune = lines_by_role(package, roles, {"fit", "tune"})
    return problems + [describe(q, o, r, roles) for q, o, r in near_lines(evals, fit_tune)]


def test_shipped_eval_lines_are_apart_from_fit_and_tune_lines():
    assert split_problems(PACKAGE) == []


def test_the_checked_lines_are_what_the_loaders_read():
    roles, _ = file_roles(PACKAGE)
    for f in roles:
        assert [line.text for line in read_lines(PACKAGE, f)] == read_sentences(PACKAGE / f), f


def test_every_recipe_file_field_has_a_role():
    """A new file field in the recipe schema must get a role here before the split test can miss it."""
    path_fields = {n for n, f in DiffusionRecipe.model_fields.items() if "Path" in str(f.annotation)}
    assert path_fields == set(FIELD_ROLES) | NOT_SPLITS


def test_fit_and_tune_overlaps_are_reported():
    """Tuning on fitting lines is allowed (no held-out claim rests on it) but worth knowing: warnings."""
    roles, _ = file_roles(PACKAGE)
    tune = lines_by_role(PACKAGE, roles, {"tune"})
    fit = lines_by_role(PACKAGE, roles, {"fit"})
    for q, o, r in near_lines(tune, fit):
        warnings.warn(f"fit-vs-tune overlap: {describe(q, o, r, roles)}", stacklevel=1)


def _copy(tmp_path: Path) -> Path:
    package = tmp_path / "actmerge"
    shutil.copytree(PACKAGE / "recipes", package / "recipes")
    shutil.copytree(PACKAGE / "data", package / "data")
    return package


def _append(path: Path, line: str) -> int:
    text = path.read_text(encoding="utf-8")
    path.write_text(text.rstrip("\n") + "\n" + line + "\n", encoding="utf-8")
    return len(path.read_text(encoding="utf-8").splitlines())


def test_a_planted_exact_duplicate_is_reported(tmp_path):
    package = _copy(tmp_path)
    fit = read_lines(package, "recipes/data/detox/toxic.txt")[7]
    # the same line up to case, punctuation and spacing
    planted = "  " + fit.text.upper().replace(",", " ;").rstrip(".!?") + " ..."
    number = _append(package / "recipes/data/detox/eval_prompts_hard.txt", planted)
    problems = split_problems(package)
    assert problems == [
        f"recipes/data/detox/eval_prompts_hard.txt:{number} equals recipes/data/detox/toxic.txt:"
        f"{fit.number} (detox: fit, detox-act: fit, detox-gguf: fit, detox-lineas: fit): {planted.strip()!r} ~ {fit.text!r}"
    ]


def test_a_planted_near_duplicate_is_reported(tmp_path):
    package = _copy(tmp_path)
    tune = next(
        x for x in read_lines(package, "recipes/data/concept/chat_tune_prompts.txt") if len(x.norm) >= 30
    )
    planted = tune.text[:10] + "x" + tune.text[11:]  # one character changed
    number = _append(package / "recipes/data/concept/chat_eval_prompts.txt", planted)
    problems = split_problems(package)
    assert len(problems) == 1
    assert problems[0].startswith(f"recipes/data/concept/chat_eval_prompts.txt:{number} is 0.9")
    assert f"recipes/data/concept/chat_tune_prompts.txt:{tune.number} (football: tune)" in problems[0]


def test_a_short_near_line_is_not_a_leak_but_a_short_equal_line_is(tmp_path):
    package = _copy(tmp_path)
    eval_file = package / "recipes/data/concept/chat_eval_prompts.txt"
    _append(eval_file, "Tell me about your dag.")  # 23 characters, one changed from a fit request
    assert split_problems(package) == []
    _append(eval_file, "tell me about your day")
    assert len(split_problems(package)) == 1


def test_files_without_a_role_and_manifest_errors_are_reported(tmp_path):
    package = _copy(tmp_path)
    (package / "recipes/data/concept/new.txt").write_text("A new file.\n", encoding="utf-8")
    manifest = package / MANIFEST
    manifest.write_text(
        manifest.read_text(encoding="utf-8") + "concept/football.txt:\n  football: fit\n", encoding="utf-8"
    )
    problems = split_problems(package)
    assert problems == [
        f"{MANIFEST}: concept/football.txt is named by a recipe already; take it out of the manifest",
        f"recipes/data/concept/new.txt has no role: name it in a recipe or give it one in {MANIFEST}",
    ]


# Names by which a script reaches a held-out split: the eval files, the eval neutral text, and the
# evaluation config (which reads a recipe's eval_prompts).
HELD_OUT_NAMES = ("eval_prompts", "chat_eval_prompts", "neutral.txt", "NEUTRAL_TEXT", "eval_config")
# Bench scripts that measure held-out splits and choose nothing (bench/results/PROTOCOL.md):
MEASURE_ONLY = {
    "lineas_table.py",  # issue 4's acceptance table of fixed rows, measured once
    "heldout.py",  # the shipped rows, measured once per shipped change and recorded (no candidates)
    "gguf_detox.py",  # the GGUF files it is given, on the split it is told (tune or heldout), in llama.cpp
}


def held_out_reads(source: str) -> list[int]:
    """Line numbers where code (not a docstring or a comment) names a held-out split."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        else:
            continue
        if any(name in text for name in HELD_OUT_NAMES):
            lines.add(node.lineno)
    return sorted(lines)


def test_bench_scripts_that_choose_read_no_held_out_split():
    bench = PACKAGE.parent / "bench"
    reads = {
        p.name: held_out_reads(p.read_text(encoding="utf-8"))
        for p in sorted(bench.glob("*.py"))
        if p.name not in MEASURE_ONLY
    }
    assert {name: lines for name, lines in reads.items() if lines} == {}
    assert all(held_out_reads((bench / name).read_text(encoding="utf-8")) for name in MEASURE_ONLY)


def test_the_bench_check_finds_a_held_out_read():
    source = '"""Never reads eval_prompts.txt."""\nprompts = read(DATA / "detox" / "eval_prompts.txt")\n'
    assert held_out_reads(source) == [2]
    assert held_out_reads("from actmerge import pipeline\nx = pipeline.NEUTRAL_TEXT\n") == [2]
