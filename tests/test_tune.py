"""`actmerge tune`: the grid + bisection search finds a known optimum, tuning reads only the tuning
split (never the eval prompts), the budget is judged on the upper end of a bootstrap interval over the
tuning texts, and `bake --strength auto` bakes the tuned λ and records it (with the interval)."""

import builtins
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import RecipeError
from actmerge.evaluation.budget import RESAMPLES, Budget, TextCosts, bootstrap
from actmerge.evaluation.search import MAX_BISECT, MAX_GRID, search
from actmerge.evaluation.tune import tune
from actmerge.models import ModelSource
from actmerge.options import TuneOptions

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
        options=TuneOptions(budget=Budget(1.10), tol=0.01, out=tmp_path / "t"),
        cost_fn=lambda lam: {"perplexity_ratio": 1 + 0.07 * lam**2, "kl": 0.01 * lam, "first_token_kl": 0.0},
        behaviour_fn=lambda lam: 0.3 / (1 + 4 * lam),
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
        options=TuneOptions(budget=Budget(1.5), max_strength=1.0, step=0.5, tol=0.25),
        progress=False,
        log=lambda *_: None,
    )
    monkeypatch.undo()
    names = {Path(p).name for p in opened}
    assert {"tune.txt", "neutral_tune.txt", "src.txt", "tgt.txt"} <= names
    assert not {"eval.txt", "eval_hard.txt"} & names, sorted(names)
    assert res.points and all(set(p.cost) >= {"perplexity_ratio", "kl", "first_token_kl"} for p in res.points)
    assert res.points[0].cost["kl"] > 0  # steered previews drift from the base
    for p in res.points:  # judged per text: the bootstrap interval over the 2 tuning texts
        lo, hi = p.interval["perplexity_ratio"]
        assert lo <= p.cost["perplexity_ratio"] <= hi and p.within == (hi <= 1.5)


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
    assert "[95 % CI]" in r.output and tuned["chosen"]["interval"]["perplexity_ratio"][1] <= 1.02
    r = runner.invoke(app, ["bake", str(model), *args, "--strength", "auto", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "o" / "actmerge" / "bake.json").read_text())
    assert info["strength"] == tuned["strength"] > 0
    assert info["tuned"]["budget"]["max_ppl_ratio"] == 1.02 and info["tuned"]["met"]
    assert info["tuned"]["cost_on_tuning_text"]["perplexity_ratio"] <= 1.02
    assert info["tuned"]["interval_on_tuning_text"]["perplexity_ratio"][1] <= 1.02  # the upper end holds
    assert info["tuned"]["budget"]["confidence"] == 0.95
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


# the budget's statistical margin: per-text costs, bootstrap over the tuning texts

TOKENS = tuple(40 + (7 * i) % 31 for i in range(60))  # 60 texts of 40..70 tokens
SLOPES = tuple(0.02 + 0.1 * ((i * 37) % 60) / 60 for i in range(60))  # per-text NLL/token per λ², 0.02..0.12


def noisy_costs(lam: float) -> TextCosts:
    """Per-text costs whose per-token ΔNLL is SLOPES[i] λ² (texts disagree: ratios spread)."""
    delta = tuple(n * a * lam**2 for n, a in zip(TOKENS, SLOPES, strict=True))
    kl = tuple(0.5 * d for d in delta)
    return TextCosts(TOKENS, delta, TOKENS, kl, first_token_kl=0.01 * lam)


def test_bootstrap_bound_is_at_least_the_point_and_equals_it_when_texts_agree():
    # every text costs the same per token: each resample has the point's ratio, the interval is a point
    same = TextCosts(TOKENS, tuple(0.05 * n for n in TOKENS), TOKENS, tuple(0.01 * n for n in TOKENS))
    point = same.point()
    assert point["perplexity_ratio"] == pytest.approx(math.exp(0.05), rel=1e-12)  # exp(Σ ΔNLL / Σ tokens)
    for name in ("perplexity_ratio", "kl"):
        lo, hi = bootstrap(same, 0.95)[name]
        assert lo == pytest.approx(point[name], rel=1e-12) and hi == pytest.approx(point[name], rel=1e-12)
    # texts disagree: the interval contains the point and its upper end is above it, wider at 0.99
    noisy = noisy_costs(1.0)
    point = noisy.point()
    for name in ("perplexity_ratio", "kl"):
        lo, hi = bootstrap(noisy, 0.95)[name]
        assert lo < point[name] < hi
        assert bootstrap(noisy, 0.99)[name][1] > hi and bootstrap(noisy, 0.5)[name][1] < hi
    assert max(noisy.ratios()) > point["perplexity_ratio"] > min(noisy.ratios())
    # deterministic (seeded resamples), and confidence 0 is the point rule: no interval
    assert bootstrap(noisy, 0.95) == bootstrap(noisy_costs(1.0), 0.95)
    assert bootstrap(noisy, 0) == {} and RESAMPLES >= 1000


def test_noisy_texts_choose_a_smaller_strength_than_the_point_rule():
    calls = []

    def cost(lam):
        calls.append(lam)
        return noisy_costs(lam)

    point_lam, met0, points0 = search(cost, Budget(1.10, confidence=0), tol=0.01)
    n_point = len(calls)
    lam, met, points = search(cost, Budget(1.10), tol=0.01)
    assert met0 and met and 0 < lam < point_lam - 0.01  # the margin costs strength
    chosen = next(p for p in points if p.strength == lam)
    lo, hi = chosen.interval["perplexity_ratio"]
    assert lo <= chosen.cost["perplexity_ratio"] <= hi <= 1.10  # the upper end holds the budget
    assert all(p.within == (p.interval["perplexity_ratio"][1] <= 1.10) for p in points)
    # the point rule would have taken a λ whose upper end is over the budget
    assert next(p for p in points0 if p.strength == point_lam).interval == {}
    assert not Budget(1.10).ok(*_judged(noisy_costs(point_lam)))
    # bounded: the margin does not lengthen the search beyond grid + bisection
    assert len(calls) - n_point <= MAX_GRID + MAX_BISECT and len(calls) - n_point <= 8 + 5
    # both budgets: each judged on its own upper end (KL = ½ ΔNLL per token here)
    lam_kl, _, _ = search(noisy_costs, Budget(None, 0.03), tol=0.01)
    lam_both, _, _ = search(noisy_costs, Budget(1.10, 0.03), tol=0.01)
    assert lam_both <= min(lam, lam_kl) + 0.01


def _judged(costs: TextCosts):
    from actmerge.evaluation.budget import judge

    cost, interval, _ = judge(costs, Budget(1.10))
    return cost, interval


@pytest.mark.parametrize("bad", [1.0, 0.995, -0.1, float("nan"), float("inf"), True, "0.9"])
def test_confidence_is_checked(bad):
    with pytest.raises(RecipeError, match="--confidence"):
        Budget(1.10, confidence=bad)
    assert Budget(1.10, confidence=0).key() == "ppl<=1.1"  # the point rule keeps its record key
    assert Budget(1.10).key() == "ppl<=1.1@0.95" and "at 95 % confidence" in Budget(1.10).describe()


def test_cli_refuses_a_bad_confidence_before_any_load(tmp_path):
    missing = tmp_path / "no-such-model"
    for verb in (["tune"], ["bake", "--strength", "auto", "-o", str(tmp_path / "o")]):
        r = runner.invoke(
            app, [*verb[:1], str(missing), "--recipe", "detox", *verb[1:], "--confidence", "1.5"]
        )
        assert r.exit_code == 2 and "--confidence 1.5" in r.output and "no-such-model" not in r.output, (
            r.output
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tune_records_the_interval_deterministically(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    root, model = setup
    src = ModelSource("pico", model)
    maps = random_maps(src.config, ["attn_ctx"], seed=1)
    runs = []
    for name in ("a", "b"):
        res = tune(
            pipeline.Loaded(src),
            root / "r.yaml",
            maps=maps,
            options=TuneOptions(budget=Budget(1.10), tol=0.01, out=tmp_path / name),
            cost_fn=noisy_costs,
            behaviour_fn=lambda lam: 0.3 / (1 + 4 * lam),
            progress=False,
            log=lambda *_: None,
        )
        runs.append(json.loads((tmp_path / name / "tune.json").read_text()))
    assert runs[0] == runs[1]  # seeded bootstrap: two runs agree to the last digit
    data = runs[0]
    assert data["budget"]["confidence"] == 0.95 and data["budget"]["key"] == "ppl<=1.1@0.95"
    lo, hi = data["chosen"]["interval"]["perplexity_ratio"]
    assert lo < data["chosen"]["cost"]["perplexity_ratio"] < hi <= 1.10 and "bootstrap" in data["note"]
    assert all(p["interval"] for p in data["points"])
    from actmerge import strength

    rec = strength.recall("pico", res.recipe_hash, Budget(1.10))
    assert rec["strength"] == res.strength and rec["chosen"]["interval"] == data["chosen"]["interval"]
    tuned = strength.from_record(rec, where="test")
    assert tuned["interval_on_tuning_text"] == data["chosen"]["interval"]
    assert tuned["budget"]["confidence"] == 0.95
    assert strength.recall("pico", res.recipe_hash, Budget(1.10, confidence=0)) is None  # another rule


def test_hooked_point_estimate_is_the_perplexity_ratio(setup):
    """The per-text terms add up to what tune reported before the interval: steered / base perplexity
    and the mean per-token KL over the neutral text."""
    from actmerge.evaluation.metrics import logit_kl, perplexity
    from actmerge.evaluation.probe import HookedProbe
    from actmerge.kinds.llm.hooks import steer
    from actmerge.recipe import load_recipe

    root, model = setup
    loaded = pipeline.Loaded(ModelSource("pico", model))
    maps = random_maps(loaded.source.config, ["attn_ctx"], seed=2)
    neutral = ["Some neutral text about bread.", "A river flows north.", "Tea grows on hills."]
    probe = HookedProbe(loaded, load_recipe(root / "r.yaml"), maps, ["p"], neutral, progress=False)
    m, tok = loaded.get()
    costs = probe.text_costs(0.8)
    with steer(m, maps, 0.8):
        steered_ppl = perplexity(m, tok, neutral)

    def steered(enc):
        with steer(m, maps, 0.8):
            return m(**enc).logits

    assert costs.point()["perplexity_ratio"] == pytest.approx(
        steered_ppl / perplexity(m, tok, neutral), rel=1e-5
    )
    assert costs.point()["kl"] == pytest.approx(
        logit_kl(lambda e: m(**e).logits, steered, tok, neutral), rel=1e-5
    )
    assert len(costs.tokens) == 3 and costs.point()["perplexity_ratio"] != 1.0
    assert probe.cost(0.8) == costs.point() and probe.text_costs(0.0).point()["perplexity_ratio"] == 1.0
