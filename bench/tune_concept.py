"""Measure candidate sites for the concept-induction recipe (football) on Gemma-3-270M, on the
tuning prompts only (the recipe's eval prompts are never used here).

    python bench/tune_concept.py [FIRST_CANDIDATE_INDEX]

Measured 2026-11-23 (40 tuning prompts, greedy, 32 new tokens, keyword presence; tuning neutral
text: base ppl 16.79; base concept presence 0 %):
  attn_ctx linear_act every layer   λ=0.5: 27.5 % ppl 19.07;  λ=1: 67.5 % ppl 31.05
  attn_ctx mean_act every layer     λ=1: 65.0 % ppl 27.42
  attn_in linear_act                λ=0.5: 67.5 % ppl 26.13;  λ=1: 52.5 % ppl 280.9 (degenerate)
  attn_in+attn_ctx linear_act       λ=1: 37.5 % ppl 2224 (degenerate: "in a penalty, in a penalty")
  post-norms scale-only             λ=1: 17.5 % ppl 28.11
  attn_ctx layers 0-8 linear_act    λ=1: 10.0 % ppl 19.43
  attn_ctx 9-17 linear_act          λ=1: 42.5 % ppl 22.12
  attn_ctx 9-17 mean_act            λ=1: 40.0 % ppl 20.82 (×1.24)   ← recipes/football.yaml
  attn_ctx 6-17 mean_act            λ=1: 50.0 % ppl 22.84 (×1.36)
  attn_ctx 12-17 mean_act           λ=1: 12.5 % ppl 18.52
"""

from __future__ import annotations

from pathlib import Path

from actmerge.estimators import ESTIMATORS
from actmerge.evaluation.metrics import concept_presence, continuations, perplexity
from actmerge.kinds.llm.collect import collect
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import load_model, resolve
from actmerge.recipe import read_sentences
from actmerge.sites import architecture_for, parse_layers, resolve_sites

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"

# (label, [(sites, layers)], estimator, fit_shift, strengths)
CANDIDATES = [
    ("attn_ctx linear_act (attention_bias)", [(["attn_ctx"], "all")], "linear_act", True, [0.5, 1.0]),
    ("attn_ctx mean_act (attention_bias)", [(["attn_ctx"], "all")], "mean_act", True, [1.0]),
    ("attn_in linear_act (attention_bias)", [(["attn_in"], "all")], "linear_act", True, [0.5, 1.0]),
    ("attn_in+attn_ctx linear_act", [(["attn_in", "attn_ctx"], "all")], "linear_act", True, [1.0]),
    ("post-norms scale-only", [(["attn_post", "mlp_post"], "all")], "linear_act", False, [1.0]),
    ("attn_ctx 0-8 linear_act", [(["attn_ctx"], "0-8")], "linear_act", True, [1.0]),
    # round 2 (after round 1 showed attn_ctx at every layer overshoots at λ = 1)
    ("attn_ctx 9-17 linear_act", [(["attn_ctx"], "9-17")], "linear_act", True, [1.0]),
    ("attn_ctx 9-17 mean_act", [(["attn_ctx"], "9-17")], "mean_act", True, [1.0]),
    ("attn_ctx 6-17 mean_act", [(["attn_ctx"], "6-17")], "mean_act", True, [1.0]),
    ("attn_ctx 12-17 mean_act", [(["attn_ctx"], "12-17")], "mean_act", True, [1.0]),
]


def main() -> None:
    import sys

    src = resolve("gemma-3-270m")
    model, tok = load_model(src)
    config = src.config
    arch = architecture_for(config)
    source = read_sentences(DATA / "concept" / "other.txt")
    target = read_sentences(DATA / "concept" / "football.txt")
    prompts = read_sentences(DATA / "concept" / "tune_prompts.txt")
    keywords = read_sentences(DATA / "concept" / "keywords.txt")
    neutral = read_sentences(DATA / "neutral_tune.txt")
    sites = resolve_sites(arch, config, list(arch.sites), "all")
    xs = collect(model, tok, source, [s.key for s in sites], progress=False)
    ys = collect(model, tok, target, [s.key for s in sites], progress=False)

    def measure(label, maps, lam):
        with steer(model, maps, lam):
            texts = continuations(model, tok, prompts, max_new_tokens=32, progress=False)
            ppl = perplexity(model, tok, neutral)
        print(
            f"{label:40s} λ={lam:<4} concept {concept_presence(texts, keywords):6.1%}  ppl {ppl:7.2f}  "
            f"| {texts[0].strip()[:70]!r}",
            flush=True,
        )

    if len(sys.argv) <= 1:
        measure("base", MapSet({}), 0.0)
    n = len(parse_layers(None, 18))
    import sys

    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    for label, parts, method, fit_shift, lams in CANDIDATES[first:]:
        chosen = {
            (s.name, s.layer)
            for names, layers in parts
            for s in sites
            if s.name in names and s.layer in parse_layers(layers, n)
        }
        maps = {}
        for s in sites:
            if (s.name, s.layer) in chosen:
                maps[s.key], _ = ESTIMATORS[method](xs[s.key], ys[s.key], fit_shift=fit_shift)
        for lam in lams:
            measure(label, MapSet(maps), lam)


if __name__ == "__main__":
    main()
