"""`actmerge tune`: the grid + bisection search finds a known optimum, tuning reads only the tuning
split (never the eval prompts), and `bake --strength auto` bakes the tuned λ and records it."""

import builtins
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import RecipeError
from actmerge.models import ModelSource
from actmerge.tune import Budget, search, tune

from .common import make_pico, random_maps

runner = CliRunner()

RECIPE = """
name: pico-tune
method: linear_act
sites:
  - site: [attn_ctx, mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
eval_prompts: eval.txt
eval_prompts_hard: eval_hard.txt
tune_prompts: tune.txt
tune_neutral: neutral_tune.txt
max_sentences: 40
batch_size: 8
eval_max_new_tokens: 4
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = make_pico("gpt2", root / "gpt2")
    (root / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(30)))
    (root / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(30)))
    (root / "eval.txt").write_text("eval prompt one\neval prompt two\n")
    (root / "eval_hard.txt").write_text("hard eval prompt\n")
    (root / "tune.txt").write_text("tune prompt a\ntune prompt b\ntune prompt c\n")
    (root / "neutral_tune.txt").write_text("Some neutral text about bread.\nA river flows north.\n")
    (root / "r.yaml").write_text(RECIPE)
    return root, model


@pytest.mark.parametrize("budget,opt", [(1.10, math.sqrt(0.10 / 0.07)), (1.02, math.sqrt(0.02 / 0.07))])
def test_search_finds_the_known_optimum_within_tolerance(budget, opt):
    # synthetic cost: ppl ratio 1 + 0.07 λ² → the largest λ within the budget is sqrt((b−1)/0.07)
    seen = []

    def cost(lam):
        seen.append(lam)
        return {"perplexity_ratio": 1 + 0.07 * lam**2, "kl": 0.01 * lam**2}

    lam, met, points = search(cost, Budget(budget), max_strength=2.0, step=0.25, tol=0.01)
    assert met and opt - 0.01 <= lam <= opt  # within the budget, at most tol below the boundary
    assert all(p.within == (p.cost["perplexity_ratio"] <= budget) for p in points)
    assert len(seen) <= 8 + 5  # grid up to the first violation + ~log2(0.25/0.01) bisection steps
    # a KL budget alone: KL 0.01 λ² ≤ 0.02 → λ ≤ √2
    lam, met, _ = search(cost, Budget(None, 0.02), tol=0.01)
    assert met and math.sqrt(2) - 0.01 <= lam <= math.sqrt(2)


def test_search_reports_an_unmet_budget_and_a_non_binding_one():
    lam, met, points = search(lambda x: {"perplexity_ratio": 2.0, "kl": 1.0}, Budget(1.1), tol=0.05)
    assert lam == 0.0 and not met and all(not p.within for p in points)
    lam, met, points = search(lambda x: {"perplexity_ratio": 1.0, "kl": 0.0}, Budget(1.1), max_strength=1.5)
    assert lam == 1.5 and met and len(points) == 6
    with pytest.raises(RecipeError):
        Budget(None, None)
    with pytest.raises(RecipeError):
        Budget(0.9)


def test_tune_on_pico_with_a_synthetic_metric(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    src = ModelSource("pico", model)
    maps = random_maps(src.config, ["attn_ctx"], seed=1)
    res = tune(
        pipeline.Loaded(src),
        root / "r.yaml",
        maps=maps,
        budget=Budget(1.10),
        cost_fn=lambda lam: {"perplexity_ratio": 1 + 0.07 * lam**2, "kl": 0.01 * lam, "first_token_kl": 0.0},
        behaviour_fn=lambda lam: 0.3 / (1 + 4 * lam),
        tol=0.01,
        out=tmp_path / "t",
        progress=False,
        log=lambda *_: None,
    )
    opt = math.sqrt(0.10 / 0.07)
    assert res.met and opt - 0.01 <= res.strength <= opt
    assert res.chosen.behaviour == pytest.approx(0.3 / (1 + 4 * res.strength))
    data = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert data["strength"] == res.strength and data["budget"]["max_ppl_ratio"] == 1.10
    assert data["chosen"]["within"] and data["base_behaviour"] == pytest.approx(0.3)
    assert (tmp_path / "t" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from actmerge.strength import recall

    assert recall("pico", res.recipe_hash, Budget(1.10))["strength"] == res.strength
    assert recall("pico", res.recipe_hash, Budget(1.05)) is None  # another budget: not recorded


def test_tune_reads_only_the_tuning_split(setup, tmp_path, monkeypatch):
    """Fit + hooked previews on the pico model; every file opened is recorded: the eval prompts
    (both splits) are never read, the tuning prompts and tuning neutral text are."""
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    opened: list[str] = []
    real_open, real_read_text, real_read_bytes = builtins.open, Path.read_text, Path.read_bytes

    def spy_open(file, *a, **k):
        opened.append(str(Path(file).resolve()) if isinstance(file, str | Path) else str(file))
        return real_open(file, *a, **k)

    def spy_read_text(self, *a, **k):
        opened.append(str(self.resolve()))
        return real_read_text(self, *a, **k)

    def spy_read_bytes(self, *a, **k):
        opened.append(str(self.resolve()))
        return real_read_bytes(self, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "read_text", spy_read_text)
    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)
    res = tune(
        pipeline.Loaded(ModelSource("pico", model)),
        root / "r.yaml",
        budget=Budget(1.5),
        max_strength=1.0,
        step=0.5,
        tol=0.25,
        progress=False,
        log=lambda *_: None,
    )
    monkeypatch.undo()
    names = {Path(p).name for p in opened}
    assert {"tune.txt", "neutral_tune.txt", "src.txt", "tgt.txt"} <= names
    assert not {"eval.txt", "eval_hard.txt"} & names, sorted(names)
    assert res.points and all(set(p.cost) >= {"perplexity_ratio", "kl", "first_token_kl"} for p in res.points)
    assert res.points[0].cost["kl"] > 0  # steered previews drift from the base


def test_bake_strength_auto_bakes_the_tuned_strength(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    # a budget nothing above λ = 0 meets (KL > 0 for any steering): bake refuses and says so
    strict = ["--recipe", str(root / "r.yaml"), "--max-kl", "1e-12"]
    r = runner.invoke(app, ["bake", str(model), *strict, "--strength", "auto", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "budget" in r.output, r.output
    assert not (tmp_path / "x").exists()
    # a budget that is met: tune records the strength and bake --strength auto bakes it
    args = ["--recipe", str(root / "r.yaml"), "--max-ppl-ratio", "1.02"]
    r = runner.invoke(
        app, ["tune", str(model), *args, "-o", str(tmp_path / "t"), "--max-strength", "1", "--tol", "0.05"]
    )
    assert r.exit_code == 0, r.output
    tuned = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert tuned["met"], tuned
    r = runner.invoke(app, ["bake", str(model), *args, "--strength", "auto", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "o" / "actmerge" / "bake.json").read_text())
    assert info["strength"] == tuned["strength"] > 0
    assert info["tuned"]["budget"]["max_ppl_ratio"] == 1.02 and info["tuned"]["met"]
    assert info["tuned"]["cost_on_tuning_text"]["perplexity_ratio"] <= 1.02
    card = (tmp_path / "o" / "README.md").read_text()
    assert "chosen by `actmerge tune`" in card and "--strength auto --max-ppl-ratio 1.02" in card
    # no record for this budget: bake tunes on the spot and bakes what it found
    r = runner.invoke(
        app,
        [
            "bake",
            str(model),
            "--recipe",
            str(root / "r.yaml"),
            "--strength",
            "auto",
            "--max-kl",
            "1e-3",
            "-o",
            str(tmp_path / "o2"),
        ],
    )
    if r.exit_code == 0:
        info2 = json.loads((tmp_path / "o2" / "actmerge" / "bake.json").read_text())
        assert (
            info2["tuned"]["budget"]["max_kl"] == 1e-3 and info2["tuned"]["cost_on_tuning_text"]["kl"] <= 1e-3
        )
    else:
        assert "budget" in r.output


def test_bake_maps_strength_auto_reads_what_tune_maps_recorded(setup, tmp_path, monkeypatch):
    """A LinEAS fit is slow: tune and bake reuse one maps file, and `bake --maps M --strength auto` bakes
    the λ that `tune --maps M` recorded; with no record it refuses (it cannot tune without the recipe)."""
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    maps = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["fit", str(model), "--recipe", str(root / "r.yaml"), "-o", str(maps)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["bake", str(model), "--maps", str(maps), "--strength", "auto", "--max-ppl-ratio", "1.02",
         "-o", str(tmp_path / "none")],
    )  # fmt: skip
    assert r.exit_code == 2 and "actmerge tune" in r.output, r.output
    assert not (tmp_path / "none").exists()
    r = runner.invoke(
        app,
        ["tune", str(model), "--recipe", str(root / "r.yaml"), "--maps", str(maps), "--max-ppl-ratio", "1.02",
         "-o", str(tmp_path / "t"), "--max-strength", "1", "--tol", "0.05", "--no-curve"],
    )  # fmt: skip
    assert r.exit_code == 0 and f"--maps {maps}" in r.output.replace("\n", ""), r.output
    tuned = json.loads((tmp_path / "t" / "tune.json").read_text())
    r = runner.invoke(
        app,
        ["bake", str(model), "--maps", str(maps), "--strength", "auto", "--max-ppl-ratio", "1.02",
         "-o", str(tmp_path / "o")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "o" / "actmerge" / "bake.json").read_text())
    assert info["strength"] == tuned["strength"] > 0 and info["tuned"]["budget"]["max_ppl_ratio"] == 1.02
