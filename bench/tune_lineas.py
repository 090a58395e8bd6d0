"""Tune recipes/detox-lineas.yaml on Gemma-3-270M (tuning split only).

Fits LinEAS variants (recipe overrides), applies the maps with hooks (hooked ≡ baked to ~1e-5) and
reports the toxic-continuation fraction on the *tuning* prompts and perplexity on the *tuning*
neutral text at several strengths. The recipe's eval prompts are never read here. Maps are saved
to out/tune-lineas/<variant>.safetensors so a variant can be re-scored without refitting.

    python bench/tune_lineas.py recipe ctx_hidden l1      # variants by name (see VARIANTS)
    python bench/tune_lineas.py --list

Measured 2026-11-23 (180 tuning prompts, base 9.4 % toxic, ppl 16.79 on neutral_tune.txt; greedy,
24 tokens; 300 steps, lr 0.01, post-norms + attn_ctx, scale-only, loss_norm target_std):
  recipe (ω learned directly)  λ=0.75: 1.1 %  ppl 18.25 (×1.087)   λ=1: 0.0 %  ppl 19.85 (×1.182)
  log (ω = exp θ)              λ=0.75: 1.1 %  ppl 18.26 (×1.088)   λ=1: 0.0 %  ppl 19.88 (×1.184)
  sparse_strong (l1 0.3, group 0.05)  λ=1: 1.1 %  ppl 18.15 (×1.081), 34 721 / 41 472 neurons moved
→ the parametrisation does not matter; the proximal shrinkage tempers the overshoot of the full
  transport: recipes/detox-lineas.yaml uses l1 0.3, group 0.05 and bakes at λ = 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lab
import torch

from actmerge import pipeline
from actmerge.evaluation.metrics import perplexity, profanity_scorer, toxicity
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import resolve
from actmerge.recipe import SiteSpec, load_recipe, read_sentences

ROOT = Path(__file__).resolve().parent.parent
DATA = lab.DATA
OUT = ROOT / "out" / "tune-lineas"

POST = ["attn_post", "mlp_post"]
# name → (recipe field overrides, lineas option overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "recipe": ({}, {}),
    "ctx_hidden": ({"sites": [SiteSpec(site=["attn_ctx", "mlp_hidden"], layers="all")]}, {}),
    "post_only": ({"sites": [SiteSpec(site=POST, layers="all")]}, {}),
    "l1": ({}, {"l1": 0.05}),
    "l1_strong": ({}, {"l1": 0.2}),
    "sparse": ({}, {"l1": 0.05, "group": 0.05}),
    "sparse_strong": ({}, {"l1": 0.3, "group": 0.05}),
    "log": ({}, {"param": "log"}),
    "raw": ({}, {"loss_norm": "none"}),
    "steps150": ({}, {"steps": 150}),
    "lr3e-3": ({}, {"lr": 0.003}),
    "b16": ({}, {"batch": 16}),
}
STRENGTHS = tuple(
    float(x)
    for x in next((a.split("=")[1] for a in sys.argv if a.startswith("--strengths=")), "0.75,1").split(",")
)


def variant(base, name: str):
    fields, opts = VARIANTS[name]
    return base.with_lineas(**opts).model_copy(update={**fields, "name": f"detox-lineas-{name}"})


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--list" in sys.argv or not names:
        print("variants:", ", ".join(VARIANTS))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = pipeline.Loaded(resolve("gemma-3-270m"))
    model, tok = loaded.get()
    base_recipe = load_recipe(lab.RECIPES / "detox-lineas.yaml")
    prompts = read_sentences(DATA / "detox" / "tune_prompts.txt")
    neutral = read_sentences(DATA / "neutral_tune.txt")
    scorer = profanity_scorer()

    def score(label: str, maps: MapSet | None, lam: float) -> None:
        if maps is None:
            tox = toxicity(model, tok, prompts, scorer, progress=False)
            ppl = perplexity(model, tok, neutral)
        else:
            with steer(model, maps, lam):
                tox = toxicity(model, tok, prompts, scorer, progress=False)
                ppl = perplexity(model, tok, neutral)
        print(
            f"{label:14s} λ={lam:<4} toxic {tox.fraction:6.1%}  mean {tox.mean:.3f}  ppl {ppl:7.2f}"
            f"  (×{ppl / base_ppl:.3f})",
            flush=True,
        )

    base_ppl = perplexity(model, tok, neutral)
    if "--no-base" not in sys.argv:
        score("base", None, 0.0)
    for name in names:
        path = OUT / f"{name}.safetensors"
        if path.exists():
            maps = MapSet.load(path)
            print(f"{name}: loaded {path}")
        else:
            t0 = time.perf_counter()
            res = pipeline.fit(loaded, variant(base_recipe, name), progress=False)
            maps = res.maps
            maps.save(path)
            print(
                f"{name}: fit {time.perf_counter() - t0:.0f}s; {res.report.selected_neurons} neurons active"
            )
        for lam in STRENGTHS:
            score(name, maps, lam)


if __name__ == "__main__":
    main()
