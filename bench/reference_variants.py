"""Shipped recipes: the actmerge variant each was tuned with vs the reference default (issue 14), on
Gemma-3-270M, on the TUNING split only (tune_prompts.txt, neutral_tune.txt; eval prompts never used).

For each recipe: fit it as shipped (it names its variants explicitly: special tokens excluded from
the mean, shift-only degenerate neurons, every row, …) and with those keys set to the reference
defaults; apply the maps with hooks at the recipe's strength; report the recipe's metric on the
tuning prompts and perplexity on the tuning neutral text, plus how far the maps moved.

    python bench/reference_variants.py            # detox, football
    python bench/reference_variants.py --lineas   # detox-lineas too (2 × 300 LinEAS steps, ~15 min)

Measured 2026-11-26 (greedy; detox: 180 tuning prompts, 24 new tokens, alt-profanity-check > 0.5;
football: 40 tuning prompts, 32 new tokens, keyword presence; ppl on neutral_tune.txt, base 16.79):
  detox    shipped variant    2.2 % toxic  ppl 18.91   reference default  2.2 % toxic  ppl 18.79
           (maps: max |Δω| 0.60, median Δ(ω−1) 3.9 % of |ω−1|)
  football shipped variant   40.0 % concept ppl 20.82  reference default 37.5 % concept ppl 20.27
           (maps: max |Δβ| 0.14)
  The shipped rows reproduce the recipes' tuning numbers (bench/tune_sites.py, bench/tune_concept.py).
  Run with OMP_NUM_THREADS=1 on a loaded machine (each row took 2-6 minutes on 2 shared cores).
"""

from __future__ import annotations

import sys
import time

import lab
import torch

from actmerge.evaluation.metrics import (
    concept_presence,
    continuations,
    perplexity,
    profanity_scorer,
    toxicity,
)
from actmerge.fold import FoldOptions
from actmerge.kinds.llm import fit as fitting
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import load_model, resolve
from actmerge.recipe import load_recipe, read_sentences

DATA = lab.DATA
REFERENCE = dict(pooling_special_tokens="include", degenerate_neurons="skip", sample="balanced")


def fit_recipe(model, tok, config, recipe):
    sites = fitting.recipe_sites(recipe, config)
    source = recipe.read_source()[: recipe.max_sentences]
    target = recipe.read_target()[: recipe.max_sentences]
    frozen = fitting.frozen_shifts(recipe, config, sites, FoldOptions.merged(recipe))
    maps, _ = fitting.fit_sites(
        model, tok, recipe, sites, source, target, frozen=frozen, progress=False, log=lambda *_: None
    )
    return maps


def main() -> None:
    torch.manual_seed(0)
    src = resolve("gemma-3-270m")
    model, tok = load_model(src)
    neutral = read_sentences(DATA / "neutral_tune.txt")
    names = ["detox", "football"] + (["detox-lineas"] if "--lineas" in sys.argv else [])
    for name in names:
        shipped = load_recipe(lab.RECIPES / f"{name}.yaml")
        update = dict(REFERENCE)
        if shipped.method == "lineas":
            update = {"pooling_special_tokens": "include"}
        reference = shipped.model_copy(update=update)
        concept = "concept" in shipped.metrics
        prompts = read_sentences(DATA / ("concept" if concept else "detox") / "tune_prompts.txt")
        keywords = read_sentences(shipped.path(shipped.keywords)) if concept else []
        fitted = {}
        for label, recipe in (("shipped variant", shipped), ("reference default", reference)):
            t0 = time.perf_counter()
            maps = fit_recipe(model, tok, src.config, recipe)
            fitted[label] = maps
            with steer(model, MapSet(maps), recipe.strength):
                if concept:
                    texts = continuations(
                        model, tok, prompts, max_new_tokens=shipped.eval_max_new_tokens, progress=False
                    )
                    score = f"concept {concept_presence(texts, keywords):6.1%}"
                else:
                    tox = toxicity(model, tok, prompts, profanity_scorer(), progress=False)
                    score = f"toxic {tox.fraction:6.1%}"
                ppl = perplexity(model, tok, neutral)
            print(
                f"{name:13s} {label:18s} {score}  ppl {ppl:6.2f}  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        a, b = fitted["shipped variant"], fitted["reference default"]
        dw = max(float((a[k].omega - b[k].omega).abs().max()) for k in a)
        db = max(float((a[k].beta - b[k].beta).abs().max()) for k in a)
        rel = [
            float((a[k].omega - b[k].omega).abs().median() / (a[k].omega - 1).abs().median().clamp_min(1e-12))
            for k in a
        ]
        print(
            f"{name:13s} maps: max |Δω| {dw:.4g}, max |Δβ| {db:.4g}, median rel. Δ(ω−1) {sorted(rel)[len(rel) // 2]:.2%}"
        )


if __name__ == "__main__":
    main()
