"""Measure candidate sites for the concept-induction recipe (football) on Gemma-3-270M, on the
tuning prompts only (the recipe's eval prompts are never used here).

    python bench/tune_concept.py
"""

from __future__ import annotations

from pathlib import Path

from actmerge.collect import collect
from actmerge.estimators import ESTIMATORS
from actmerge.evaluate import concept_presence, continuations, perplexity
from actmerge.hooks import steer
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
]


def main() -> None:
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

    measure("base", MapSet({}), 0.0)
    n = len(parse_layers(None, 18))
    for label, parts, method, fit_shift, lams in CANDIDATES:
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
