"""KL(base ‖ steered) on the real Gemma-3-270M (slow; runs in CI): exactly 0 at λ = 0, growing with
λ, measured on the tuning neutral text with the detox-act recipe's maps as hooks."""

from pathlib import Path

import pytest

from actmerge import pipeline
from actmerge.evaluation.kl import drift, steered_fn
from actmerge.evaluation.records import EvalConfig
from actmerge.recipe import load_recipe, read_sentences

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "detox-act.yaml"  # Linear-AcT: a fit of seconds

pytestmark = pytest.mark.slow


def test_kl_is_zero_at_lambda_0_and_grows_with_lambda():
    recipe = load_recipe(RECIPE).model_copy(update={"max_sentences": 48})
    loaded = pipeline.load("gemma-3-270m", log=lambda *_: None)
    maps = pipeline.fit(loaded, recipe, progress=False, log=lambda *_: None).maps
    model, tok = loaded.get()
    neutral = read_sentences(recipe.path(recipe.tune_neutral))[:6]
    cfg = EvalConfig(prompts=[], neutral=neutral)
    kl = {lam: drift(model, steered_fn(model, maps, lam, None), tok, cfg) for lam in (0.0, 0.5, 1.0)}
    print({lam: {k: round(v, 5) for k, v in d.items()} for lam, d in kl.items()})
    assert kl[0.0] == {"kl": 0.0, "first_token_kl": 0.0}  # the identity map changes nothing, exactly
    assert 0 < kl[0.5]["kl"] < kl[1.0]["kl"] < 1.0  # nats per token: steering costs, more with λ
    assert 0 < kl[0.5]["first_token_kl"] < kl[1.0]["first_token_kl"]
