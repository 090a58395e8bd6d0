"""One strength gate (``actmerge/strength.py``): parse, rules, names, the recipe default and the tune
record for ``--strength auto``, at every entry point — bake, eval, verify, compose,
export-control-vector, tune — with one-line errors before any load; and tune's search bounded."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge import hub, pipeline
from actmerge import strength as st
from actmerge.cli import app
from actmerge.errors import RecipeError
from actmerge.evaluation.budget import Budget
from actmerge.evaluation.search import MAX_BISECT, MAX_GRID, search
from actmerge.models import ModelSource
from actmerge.recipe import load_recipe

from .common import random_maps, write_cli_setup

runner = CliRunner()
RECIPE = """
name: gate
sites:
  - site: [attn_ctx]
    layers: all
source: src.txt
target: tgt.txt
batch_size: 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("strength")
    model = write_cli_setup(root, RECIPE)
    config = ModelSource("pico", model).config
    maps = random_maps(config, ["attn_ctx"], seed=3)
    maps.recipe_hash = "feedc0de"
    maps.save(root / "maps.safetensors")
    random_maps(config, ["mlp_out"], seed=4).save(root / "cv-maps.safetensors")
    return root, model


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _refused(r, needle: str, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    assert needle in r.output, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its digest (what a refusal must leave as it was)."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# --- the rules, the parser and the names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (math.nan, "not a finite number"),
        (math.inf, "not a finite number"),
        (-1, "< 0"),
        (5, "--allow-extrapolation"),
        ("abc", "is not a number"),
        (None, "is not a number"),
    ],
)
def test_every_rule_has_one_message(value, needle):
    with pytest.raises(RecipeError, match=needle.replace("-", r"\-")):
        st.one(value)


def test_check_keeps_order_dedupes_and_allows_extrapolation_when_asked():
    said = []
    assert st.check([0.5, 1, 0.5, -0.0], warn=said.append) == [0.5, 1.0, 0.0]
    assert str(st.check([-0.0])[0]) == "0.0"  # one number, one name
    assert st.check([1, 1], unique=False) == [1.0, 1.0]  # composed: one per recipe, repeats kept
    assert st.check([5], allow_extrapolation=True, warn=said.append) == [5.0]
    assert said == ["warning: strength 5 > 1 extrapolates the transport beyond the target distribution."]


def test_parse():
    assert st.parse("0.5, 1") == [0.5, 1.0] and st.parse("") == [] and st.parse(None) is None
    assert st.parse("nan") != st.parse("nan")  # parsed, not judged: the verb checks it
    with pytest.raises(RecipeError, match="'auto' is for `actmerge bake --strength auto`"):
        st.parse("auto,1", what="--strengths")
    assert st.is_auto(" auto") and not st.is_auto("0.5")


def test_names_are_short_for_ordinary_strengths_and_exact_otherwise(tmp_path):
    assert [st.label(x) for x in (0.5, 1.0, 2.33, 0.25, 0.0)] == [
        "lambda-0.5",
        "lambda-1",
        "lambda-2.33",
        "lambda-0.25",
        "lambda-0",
    ]
    near = [0.5, 0.5000001, 0.50000001, 1 / 3]
    assert len({st.label(x) for x in near}) == len(near)
    assert all(float(st.text(x)) == x for x in near)  # the text reads back as the same number
    assert st.out_for(tmp_path, 0.5, [0.5]) == tmp_path
    assert st.out_for(tmp_path, 0.5000001, [0.5, 0.5000001]) == tmp_path / "lambda-0.5000001"
    assert hub.strength_repo_id("alice/m", 0.5000001) == "alice/m-lambda-0.5000001"


# --- bake ---------------------------------------------------------------------------------------------


def test_near_equal_strengths_get_their_own_directories(setup, tmp_path):
    """`-s 0.5,0.5000001 --force` named both lambda-0.5, reported both written, and the first was gone."""
    root, model = setup
    out = tmp_path / "o"
    r = _cli("bake", model, "--maps", root / "maps.safetensors", "-s", "0.5,0.5000001", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["lambda-0.5", "lambda-0.5000001"]
    for name, lam in (("lambda-0.5", 0.5), ("lambda-0.5000001", 0.5000001)):
        info = json.loads((out / name / "actmerge" / "bake.json").read_text())
        assert info["strength"] == lam
    # the card's Reproduce command gives the exact strength, not its 6-digit rounding
    assert "--strength 0.5000001 " in (out / "lambda-0.5000001" / "README.md").read_text()
    # verify: the same gate
    before = _tree(out)
    _refused(_cli("verify", out / "lambda-0.5", "--strength", "nan"), "not a finite number")
    _refused(_cli("verify", out / "lambda-0.5", "--strength", "-1"), "< 0")
    assert _tree(out) == before


def test_composed_recipes_keep_repeated_strengths(setup, tmp_path):
    """One λ per recipe: `-r a -r b -s 0.5,0.5` is two strengths, not one (they were deduplicated)."""
    root, model = setup
    (root / "b-repeat.yaml").write_text(RECIPE.replace("gate", "gate-b"))  # data files beside it
    r = _cli("bake", model, "-r", root / "r.yaml", "-r", root / "b-repeat.yaml", "-s", "0.5,0.5", "--dry-run")
    assert r.exit_code == 0, r.output


def _record(model: str, recipe_hash: str, lam: float, budget: Budget = Budget()) -> Path:
    """What `actmerge tune` writes, by hand (as `tune --max-strength -1` once recorded it)."""
    path = st.record_path(model, recipe_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {
        "strength": lam,
        "met": True,
        "budget": {"max_ppl_ratio": budget.max_ppl_ratio, "max_kl": None, "key": budget.key()},
        "metric": "toxic_fraction",
        "chosen": {"strength": lam, "cost": {"perplexity_ratio": 1.05, "kl": 0.01}, "behaviour": 0.1},
        "base_behaviour": 0.3,
        "n_tune_prompts": 3,
        "note": "by hand",
    }
    path.write_text(json.dumps({budget.key(): rec}))
    return path


@pytest.mark.parametrize(("lam", "needle"), [(-1, "< 0"), (5, "--allow-extrapolation"), (math.nan, "finite")])
def test_strength_auto_refuses_a_bad_record_before_any_fit(setup, tmp_path, monkeypatch, lam, needle):
    """`--strength auto` baked whatever tune recorded (λ = −1 after `tune --max-strength -1`)."""
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup

    def no_fit(*a, **k):
        raise AssertionError("fitted before the recorded strength was checked")

    monkeypatch.setattr(pipeline, "fit", no_fit)
    recipe = load_recipe(root / "r.yaml")
    record = _record(str(model), recipe.content_hash(), lam)
    before = _tree(tmp_path)
    r = _cli("bake", model, "--recipe", root / "r.yaml", "--strength", "auto", "-o", tmp_path / "o")
    _refused(r, needle)
    assert str(record) in r.output.replace("\n", "") and "actmerge tune" in r.output
    assert _tree(tmp_path) == before


def test_strength_auto_with_maps_follows_the_rules_of_a_typed_strength(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    maps = root / "maps.safetensors"
    _record(str(model), "feedc0de", 5.0)
    base = ("bake", model, "--maps", maps, "--strength", "auto", "--dry-run")
    _refused(_cli(*base), "--allow-extrapolation")
    r = _cli(*base, "--allow-extrapolation")
    assert r.exit_code == 0 and "λ = 5 (recorded by actmerge tune" in r.output, r.output
    _record(str(model), "feedc0de", -1.0)
    _refused(_cli(*base, "--allow-extrapolation"), "< 0")
    st.record_path(str(model), "feedc0de").write_text("{not json")
    _refused(_cli(*base), "is damaged: delete it")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-ppl-ratio", "nan"], "not a finite number"),
        (["--max-kl", "inf"], "not a finite number"),
        (["--max-ppl-ratio", "0"], "≤ 1"),  # was taken as "no budget given": ×1.10
    ],
)
def test_bake_auto_budgets_are_checked_before_any_load(setup, tmp_path, monkeypatch, flags, needle):
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    r = _cli("bake", model, "--maps", root / "maps.safetensors", "--strength", "auto", *flags, "--dry-run")
    _refused(r, needle)


# --- eval, compose, export-control-vector -------------------------------------------------------------


def test_eval_refuses_strengths_outside_the_rules_before_any_load(setup, tmp_path, monkeypatch):
    """`eval --strengths nan` produced NaN rows."""
    root, model = setup
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for value, needle in (("nan", "not a finite number"), ("0,-0.5", "< 0"), ("10", "--allow-extrapolation")):
        r = _cli(
            "eval", model, "--maps", root / "maps.safetensors", "--strengths", value, "-o", tmp_path / "r"
        )
        _refused(r, needle)
    _refused(
        _cli("eval", model, "--maps", root / "maps.safetensors", "--strengths", "auto", "-o", tmp_path / "r"),
        "is for `actmerge bake --strength auto`",
    )
    assert list(tmp_path.iterdir()) == []


def test_compose_checks_every_strength_and_keeps_repeats(setup, tmp_path):
    root, model = setup
    maps = root / "maps.safetensors"
    _refused(_cli("compose", maps, maps, "-s", "1,nan", "-o", tmp_path / "c.safetensors"), "finite")
    _refused(_cli("compose", maps, maps, "-s", "1,auto", "-o", tmp_path / "c.safetensors"), "not a number")
    assert list(tmp_path.iterdir()) == []
    r = _cli("compose", maps, maps, "-s", "0.5,0.5000001", "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    from actmerge.maps import MapSet

    assert MapSet.load(tmp_path / "c.safetensors").extra["strengths"] == "0.5,0.5000001"


def test_control_vector_strength_passes_the_gate(setup, tmp_path):
    """`export-control-vector -s nan --partial` wrote an all-NaN vector (exit 0)."""
    root, model = setup
    maps = root / "cv-maps.safetensors"
    base = ("export-control-vector", maps, "--model", model, "--partial", "-o", tmp_path / "cv.gguf")
    _refused(_cli(*base, "-s", "nan"), "not a finite number")
    _refused(_cli(*base, "-s", "-1"), "< 0")
    _refused(_cli(*base, "-s", "5"), "--allow-extrapolation")
    assert list(tmp_path.iterdir()) == []
    r = _cli(*base, "-s", "5", "--allow-extrapolation")
    assert r.exit_code == 0 and (tmp_path / "cv.gguf").is_file(), r.output


# --- tune: options checked before any load, the search bounded ----------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tol", "0"], "--tol 0: give a finite number > 0"),
        (["--tol", "-0.1"], "--tol -0.1: give a finite number > 0"),
        (["--tol", "1e-12"], "use --tol ≥"),
        (["--step", "0"], "--step 0: give a finite number > 0"),
        (["--step", "nan"], "--step nan"),
        (["--step", "1e-4"], f"(at most {MAX_GRID})"),
        (["--max-strength", "nan"], "--max-strength nan is not a finite number"),
        (["--max-strength", "-1"], "--max-strength -1 < 0"),
        (["--max-strength", "0"], "only λ = 0 would be tried"),
        (["--max-strength", "5"], "--allow-extrapolation"),
        (["--max-ppl-ratio", "nan"], "--max-ppl-ratio nan is not a finite number"),
        (["--max-kl", "-1"], "≤ 0: only λ = 0 meets it"),
    ],
)
def test_tune_options_are_checked_before_any_load(setup, tmp_path, monkeypatch, flags, needle):
    """`tune --tol 0` bisected forever, `--step 0` raised ZeroDivisionError after the fit,
    `--max-strength nan` a ValueError, `--max-ppl-ratio nan` was accepted."""
    root, model = setup
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = _cli("tune", model, "--recipe", root / "r.yaml", "-o", tmp_path / "t", *flags)
    _refused(r, needle)
    assert list(tmp_path.iterdir()) == []


def test_search_is_bounded_however_it_is_called():
    calls = []

    def cost(lam):
        calls.append(lam)
        if len(calls) > 200:
            raise RuntimeError("unbounded search")
        return {"perplexity_ratio": 1 + 0.07 * lam * lam, "kl": 0.0}

    for bad in (dict(tol=0), dict(tol=-1), dict(step=0), dict(max_strength=math.nan)):
        with pytest.raises(RecipeError):
            search(cost, Budget(1.10), **bad)
    assert calls == []
    # the finest search the options allow still ends within the stated cap
    lam, met, points = search(cost, Budget(1.10), max_strength=4.0, step=4 / MAX_GRID, tol=1e-6)
    assert met and len(points) <= MAX_GRID + MAX_BISECT
    assert abs(lam - math.sqrt(0.10 / 0.07)) < 1e-5
    # extrapolated search only when asked
    with pytest.raises(RecipeError, match="--allow-extrapolation"):
        search(cost, Budget(1.10), max_strength=8.0, step=1.0)
    calls.clear()
    assert search(cost, Budget(1.10), max_strength=8.0, step=1.0, allow_extrapolation=True)[1]
