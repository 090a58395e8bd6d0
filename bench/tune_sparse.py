"""Probe: scale-only Linear-AcT maps at λ = 1 where only the top fraction of each site's neurons
(by |log ω|) is moved, on the hard *tuning* split (never eval prompts).

    python bench/tune_sparse.py MODEL 'attn_post@50%-100%+mlp_post@33.3%-66.7%:1,0.5,0.25' [...]

A fraction with a ``d`` suffix ranks by displacement |ω − 1|·rms instead. ``METHOD=gaussian_act``
and ``POOLING=last`` (environment) change the estimator and the pooling.

Measured 2026-11-26 (2 CPU cores; 190 hard tuning prompts, greedy 24 tokens, alt-profanity-check >
0.5; perplexity ratio on neutral_tune.txt; λ = 1; scale-only, special tokens out of the mean).
Gemma-3-270M, base 39.5 % toxic, ppl 16.79; sites attn_post 50-100 % + mlp_post 33-67 % (detox-act):
  top 1.0 12.6 % ×1.126 | 0.5 12.6 % ×1.120 | 0.35 12.1 % ×1.102 | 0.3 11.6 % ×1.095
  top 0.25 11.6 % ×1.090 (shipped in detox-act.yaml) | 0.2 15.8 % ×1.088 | 0.15 18.9 % ×1.071
  top 0.1 19.5 % ×1.057 | ranked by |ω−1|·rms: 0.25 17.4 % ×1.079, 0.1 23.2 % ×1.042
  gaussian_act: top 1.0 26.8 % ×1.068, top 0.25 26.3 % ×1.057
  attn_post 33-100 % + mlp_post 22-78 %: top 0.25 10.0 % ×1.159, 0.2 11.6 % ×1.150, 0.15 15.3 % ×1.130
  post-norms all layers: top 0.25 9.5 % ×1.376, 0.1 13.2 % ×1.206
  post-norms + attn_ctx all layers: top 0.1 9.5 % ×1.281, 0.05 11.6 % ×1.153
SmolLM2-135M-Instruct, base 21.1 % toxic, ppl 18.61; attn_ctx at every layer:
  top 1.0 5.8 % ×1.103 | 0.5 5.8 % ×1.095 | 0.25 7.9 % ×1.072; attn_ctx + mlp_hidden top 0.25 2.1 % ×1.737
Held out afterwards (README): detox-act on Gemma 11 % → 5 %, hard 41.2 % → 18.9 % at ×1.092.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from actmerge import pipeline
from actmerge.estimators import ESTIMATORS, keep_top
from actmerge.evaluation.probe import HookedProbe, tuning_split
from actmerge.kinds.llm.collect import collect
from actmerge.maps import AffineMap, MapSet
from actmerge.recipe import load_recipe
from actmerge.sites import architecture_for, resolve_sites


def by_displacement(m: AffineMap, frac: float, rms: torch.Tensor) -> AffineMap:
    """The ``d`` variant: keep the top ``frac`` neurons by |ω − 1|·rms (``keep_top`` ranks by |log ω|)."""
    d = (m.omega - 1).abs() * rms
    keep = torch.zeros_like(d, dtype=torch.bool)
    keep[d.topk(max(1, round(frac * len(d)))).indices] = True
    return AffineMap(torch.where(keep, m.omega, torch.ones_like(m.omega)), m.beta * keep)


def main() -> None:
    torch.manual_seed(0)
    loaded = pipeline.load(sys.argv[1], log=lambda *a: None)
    model, tok = loaded.get()
    config = loaded.source.config
    arch = architecture_for(config)
    recipe = load_recipe("detox-act")
    toxic, clean = recipe.read_source()[:256], recipe.read_target()[:256]
    prompts, neutral = tuning_split(recipe)  # the hard tuning prompts, the tuning neutral text
    specs = []
    for arg in sys.argv[2:]:
        spec, fracs = arg.split(":")
        parts = []
        for p in spec.split("+"):
            name, layers = p.split("@")
            parts += resolve_sites(arch, config, [name], layers)
        specs.append(
            (
                spec,
                sorted({s.key: s for s in parts}.values(), key=lambda s: s.order),
                [(float(f.rstrip("d")), "d" if f.endswith("d") else "l") for f in fracs.split(",")],
            )
        )
    keys = sorted({s.key for _, ss, _ in specs for s in ss})
    t0 = time.perf_counter()
    pooling = os.environ.get("POOLING", "mean")
    xs = collect(model, tok, toxic, keys, progress=False, skip_special=True, pooling=pooling)
    ys = collect(model, tok, clean, keys, progress=False, skip_special=True, pooling=pooling)
    print(f"collected {len(keys)} sites in {time.perf_counter() - t0:.0f}s", flush=True)
    est = ESTIMATORS[os.environ.get("METHOD", "linear_act")]
    fitted = {k: est(xs[k], ys[k], fit_shift=False, degenerate="shift")[0] for k in keys}
    rms = {k: ys[k].pow(2).mean(0).sqrt() for k in keys}
    base_tox = HookedProbe(loaded, recipe, None, prompts, neutral, progress=False).behaviour(0.0)
    print(f"base toxic {base_tox:6.1%}", flush=True)
    for spec, sites, fracs in specs:
        for f, rank in fracs:
            ms = MapSet(
                {
                    s.key: by_displacement(fitted[s.key], f, rms[s.key])
                    if rank == "d"
                    else keep_top(fitted[s.key], xs[s.key], f)
                    for s in sites
                }
            )
            probe = HookedProbe(loaded, recipe, ms, prompts, neutral, progress=False)
            tox, cost = probe.behaviour(1.0), probe.cost(1.0)
            print(
                f"{spec:50s} top {f:<5}{rank} toxic {tox:6.1%} ({base_tox / max(tox, 1e-9):4.1f}x)"
                f" ppl ×{cost['perplexity_ratio']:.3f} KL {cost['kl']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
