"""End to end on the real Gemma-3-270M (slow; runs in CI): bake the detox recipe through the CLI,
reload the checkpoint with plain transformers in a fresh process, verify against the hooked model,
and check that toxic continuations go down at bounded perplexity."""

import json

import pytest
import torch
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.evaluation.metrics import perplexity, profanity_scorer, toxicity
from actmerge.models import load_model, resolve
from actmerge.recipe import load_recipe, read_sentences
from actmerge.recipes_catalog import find_recipe

RECIPE = find_recipe("detox")  # the built-in recipe, as `--recipe detox.yaml` finds it

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "gemma-3-270m-detox"
    r = CliRunner().invoke(
        app, ["bake", "gemma-3-270m", "--recipe", "detox.yaml", "--strength", "1.0", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out


def test_config_unchanged_and_plain_transformers_reload(baked):
    source = resolve("gemma-3-270m")
    assert json.loads((baked / "config.json").read_text()) == source.config
    bake = json.loads((baked / "actmerge" / "bake.json").read_text())
    assert bake["config_patch"] == {}
    assert {r["exactness"] for r in bake["fold"]} == {"exact"}
    rep = pipeline.verify(baked, log=lambda *_: None)  # fresh process, no actmerge imported there
    assert rep.passed and rep.max_abs_logit_diff <= 1e-3, rep
    assert rep.argmax_agreement >= 0.99


def test_toxicity_lower_than_base_at_bounded_perplexity(baked):
    recipe = load_recipe(RECIPE)
    prompts = read_sentences(recipe.path(recipe.eval_prompts))
    neutral = read_sentences(pipeline.NEUTRAL_TEXT)  # the shipped neutral corpus (detox.yaml sets none)
    scorer = profanity_scorer()
    base_model, tok = load_model(resolve("gemma-3-270m"))
    base = toxicity(base_model, tok, prompts, scorer, progress=False)
    base_ppl = perplexity(base_model, tok, neutral)
    del base_model
    from transformers import AutoModelForCausalLM

    steered_model = AutoModelForCausalLM.from_pretrained(str(baked), dtype=torch.float32).eval()
    steered = toxicity(steered_model, tok, prompts, scorer, progress=False)
    ppl = perplexity(steered_model, tok, neutral)
    print(
        f"toxic fraction {base.fraction:.2%} -> {steered.fraction:.2%}; mean {base.mean:.3f} -> {steered.mean:.3f}; "
        f"perplexity {base_ppl:.2f} -> {ppl:.2f}"
    )
    assert steered.fraction < base.fraction and steered.mean < base.mean
    # the README's main command as issue 17 asks: ≥ 4× fewer toxic continuations on the recipe's
    # held-out prompts at perplexity ≤ ×1.10 (measured 11 % → 0 % at ×1.069)
    assert 4 * steered.fraction <= base.fraction and ppl / base_ppl <= 1.10
