"""Measure candidate sites for the detox recipe on Gemma-3-270M (tuning split only).

Collects pooled activations once at every site, fits variants (which sites, with/without shifts,
strength), applies them with hooks and reports toxic-continuation fraction on the *tuning* prompts
and perplexity on the *tuning* neutral text. The recipe's eval prompts are never used here.

    python bench/tune_sites.py               # single-site-family grid
    python bench/tune_sites.py --layers      # layer subsets of the post-norms (scale-only refit)
    python bench/tune_sites.py --combos      # the short list
    python bench/tune_sites.py --incremental # the short list with the paper's incremental fitting

Measured 2026-11-23 (greedy, 24 new tokens, alt-profanity-check > 0.5, λ = 1 unless noted).
60 tuning prompts, base 15.0 % toxic, ppl 16.79 (neutral_tune.txt):
  post-norms, β dropped from a full fit   λ=0.5/0.75/1: 11.7 / 13.3 / 15.0 %   ppl 17.3 / 18.0 / 19.3
  post-norms, scale-only refit           λ=0.5/0.75/1:  5.0 /  0.0 /  1.7 %   ppl 18.8 / 21.6 / 26.7
  attn_ctx, β dropped                    11.7 %  ppl 17.4
  attn_ctx+mlp_hidden, scale-only refit  λ=0.5/1: 5.0 / 0.0 %   ppl 19.1 / 30.5
  attn_post 9-17 (refit) 5.0 % ppl 17.5;  mlp_post 0-8 1.7 % ppl 20.8;  post-norms 4-13 0.0 % ppl 20.4
  post-norms 6-11 3.3 % ppl 18.9;  attn_post 9-17 + mlp_post 6-11 3.3 % ppl 18.9
  incremental fitting did not help: attn_post 9-17 + mlp_post 6-11 → 5.0 % ppl 18.9
180 tuning prompts (60 + 120 milder rants), base 9.4 % toxic, ppl 16.79:
  attn_post 9-17 + mlp_post 6-11   2.2 %  ppl 18.91 (×1.126)   ← recipes/detox.yaml
  post-norms 6-11                  3.3 %  ppl 18.94
  attn_post 9-17 + mlp_post 4-9    1.7 %  ppl 19.02
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from actmerge.estimators import linear_act
from actmerge.evaluation.metrics import perplexity, profanity_scorer, toxicity
from actmerge.fold import capabilities
from actmerge.kinds.llm.collect import collect
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import load_model, resolve
from actmerge.recipe import read_sentences
from actmerge.sites import architecture_for, resolve_sites

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"


def main() -> None:
    torch.manual_seed(0)
    src = resolve("gemma-3-270m")
    model, tok = load_model(src)
    config = src.config
    arch = architecture_for(config)
    toxic = read_sentences(DATA / "detox" / "toxic.txt")
    clean = read_sentences(DATA / "detox" / "nontoxic.txt")
    prompts = read_sentences(DATA / "detox" / "tune_prompts.txt")
    neutral = read_sentences(DATA / "neutral_tune.txt")
    sites = resolve_sites(arch, config, list(arch.sites), "all")
    keys = [s.key for s in sites]
    t0 = time.perf_counter()
    xs = collect(model, tok, toxic, keys, progress=False)
    ys = collect(model, tok, clean, keys, progress=False)
    print(f"collected {len(keys)} sites in {time.perf_counter() - t0:.1f}s")
    scorer = profanity_scorer()
    caps = {r["site"]: r["shift"] for r in capabilities(arch, config)}
    print("shift classes:", caps)

    def run(label, names, lam, mode, layers=None):
        maps = {}
        for s in sites:
            if s.name not in names or (layers is not None and s.layer not in layers):
                continue
            if mode == "refit":
                m, _ = linear_act(xs[s.key], ys[s.key], fit_shift=False)
            else:
                m, _ = linear_act(xs[s.key], ys[s.key])
                if mode == "drop":
                    m = m.scale_only()
            maps[s.key] = m
        ms = MapSet(maps)
        with steer(model, ms, lam):
            tox = toxicity(model, tok, prompts, scorer, progress=False)
            ppl = perplexity(model, tok, neutral)
        print(
            f"{label:45s} λ={lam:<4} toxic {tox.fraction:6.1%}  mean {tox.mean:.3f}  ppl {ppl:7.2f}",
            flush=True,
        )
        return tox, ppl

    base_tox, base_ppl = run("base", [], 0.0, "full")
    import sys

    if "--incremental" in sys.argv:
        from actmerge.kinds.llm.collect import FitOptions, fit

        P, M = ["attn_post"], ["mlp_post"]
        for label, parts in (
            ("inc attn_post 9-17 + mlp_post 6-11", [(P, "9-17"), (M, "6-11")]),
            ("inc attn_post all + mlp_post 6-11", [(P, "all"), (M, "6-11")]),
            ("inc post-norms 4-13", [(P + M, "4-13")]),
            ("inc post-norms all", [(P + M, "all")]),
        ):
            chosen = []
            for names, layers in parts:
                chosen += resolve_sites(arch, config, names, layers)
            chosen = sorted({s.key: s for s in chosen}.values(), key=lambda s: s.order)
            maps, _ = fit(
                model, tok, chosen, toxic, clean, options=FitOptions(incremental=True, fit_shift=False),
                progress=False,
            )  # fmt: skip
            for lam in (1.0,):
                with steer(model, MapSet(maps), lam):
                    tox = toxicity(model, tok, prompts, scorer, progress=False)
                    ppl = perplexity(model, tok, neutral)
                print(
                    f"{label:45s} λ={lam} toxic {tox.fraction:6.1%}  mean {tox.mean:.3f}  ppl {ppl:7.2f}",
                    flush=True,
                )
        return
    if "--combos" in sys.argv:

        def combo(label, parts):
            maps_layers = {}
            for names, layers in parts:
                for n in names:
                    maps_layers.setdefault(n, set()).update(layers)
            # evaluate the union of (site, layer) pairs
            sel = {(n, layer) for n, ls in maps_layers.items() for layer in ls}
            nonlocal_sites = [s for s in sites if (s.name, s.layer) in sel]
            maps = {}
            for s in nonlocal_sites:
                maps[s.key], _ = linear_act(xs[s.key], ys[s.key], fit_shift=False)
            with steer(model, MapSet(maps), 1.0):
                tox = toxicity(model, tok, prompts, scorer, progress=False)
                ppl = perplexity(model, tok, neutral)
            print(
                f"{label:45s} λ=1 toxic {tox.fraction:6.1%}  mean {tox.mean:.3f}  ppl {ppl:7.2f}", flush=True
            )

        P, M = ["attn_post"], ["mlp_post"]
        combo("attn_post 9-17 + mlp_post 6-11", [(P, range(9, 18)), (M, range(6, 12))])
        combo("post-norms 6-11", [(P + M, range(6, 12))])
        combo("attn_post 9-17 + mlp_post 4-9", [(P, range(9, 18)), (M, range(4, 10))])
        combo("post-norms 7-12", [(P + M, range(7, 13))])
        combo("attn_post 9-17", [(P, range(9, 18))])
        combo("mlp_post 0-8", [(M, range(0, 9))])
        combo("attn_post all + mlp_post 6-11", [(P, range(0, 18)), (M, range(6, 12))])
        return
    if "--layers" in sys.argv:
        for names in (["attn_post"], ["attn_post", "mlp_post"], ["mlp_post"]):
            for label, layers in (
                ("0-5", range(0, 6)),
                ("6-11", range(6, 12)),
                ("12-17", range(12, 18)),
                ("0-8", range(0, 9)),
                ("9-17", range(9, 18)),
                ("4-13", range(4, 14)),
            ):
                run(f"{'+'.join(names)} refit layers {label}", names, 1.0, "refit", set(layers))
        return
    grid = [
        ("post-norms scale (β dropped)", ["attn_post", "mlp_post"], "drop", [0.5, 0.75, 1.0]),
        ("post-norms scale (refit, β=0)", ["attn_post", "mlp_post"], "refit", [0.5, 0.75, 1.0]),
        ("attn_ctx scale (β dropped)", ["attn_ctx"], "drop", [1.0]),
        ("attn_ctx+mlp_hidden scale (refit)", ["attn_ctx", "mlp_hidden"], "refit", [0.5, 1.0]),
        (
            "attn_ctx+post-norms scale (refit)",
            ["attn_ctx", "attn_post", "mlp_post"],
            "refit",
            [0.5, 0.75, 1.0],
        ),
        ("mlp_post scale (refit)", ["mlp_post"], "refit", [0.5, 1.0]),
        ("attn_post scale (refit)", ["attn_post"], "refit", [1.0]),
    ]
    for label, names, mode, lams in grid:
        for lam in lams:
            run(label, names, lam, mode)
    print(f"base: toxic {base_tox.fraction:.1%}, ppl {base_ppl:.2f}")


if __name__ == "__main__":
    main()
