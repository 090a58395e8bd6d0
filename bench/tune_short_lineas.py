"""Probe: can a *short* fold-aware LinEAS fit (a couple of minutes on 2 CPU cores) make the README's
main command (`detox.yaml`, λ = 1) stronger? Fits variants of `detox-lineas.yaml` and measures each
at λ = 1 on the hard *tuning* split and the tuning neutral text (never eval prompts).

    python bench/tune_short_lineas.py gemma-3-270m 'steps=40,lr=0.05' 'steps=60,lr=0.03,max_tokens=64'

``LAMS=0.8,1`` (environment): the strengths measured. Keys: any ``lineas:`` option, ``max_tokens``,
``max_sentences``, ``sites=attn_post+mlp_post`` (Gemma row, all layers), ``llama_sites=attn_ctx+mlp_hidden``
(the other families' row, all layers).

Measured 2026-11-26 (2 CPU cores, fit seconds include activation collection; 190 hard tuning
prompts, greedy 24 tokens, alt-profanity-check > 0.5; perplexity ratio on neutral_tune.txt):
Gemma-3-270M, base 39.5 % toxic, λ = 1:
  steps=40,lr=0.05 (128 tokens)                    8.4 % ×1.080  245 s (another job running)
  steps=40,lr=0.05,max_tokens=64,post-norms only   8.4 % ×1.098   79 s
  steps=60,lr=0.03,max_tokens=64                   7.4 % ×1.073  124 s
  steps=40,lr=0.05,max_tokens=64                   8.4 % ×1.080   78 s  ← recipes/detox.yaml
  steps=45,lr=0.04,max_tokens=64                   8.4 % ×1.076   97 s
SmolLM2-135M-Instruct, base 21.1 % toxic:
  steps=40,lr=0.05 (128 tokens)   λ = 0.8 4.7 % ×1.080, λ = 1 2.6 % ×1.129   93 s
  steps=40,lr=0.05,max_tokens=64  λ = 0.8 4.7 % ×1.080, λ = 1 2.6 % ×1.129  100 s
"""

from __future__ import annotations

import os
import sys
import time

import torch

from actmerge import pipeline
from actmerge.evaluation.probe import HookedProbe, tuning_split
from actmerge.recipe import LineasOptions, SiteSpec, load_recipe


def variant(base, spec: str):
    top, lin = {}, {}
    for kv in filter(None, spec.split(",")):
        k, v = kv.split("=")
        if k in ("max_tokens", "max_sentences"):
            top[k] = int(v)
        elif k in ("sites", "llama_sites"):
            row = "gemma" if k == "sites" else "default"
            top["sites"] = {**top.get("sites", base.sites), row: [SiteSpec(site=v.split("+"), layers="all")]}
        else:
            lin[k] = type(getattr(LineasOptions(), k))(v)
    return base.with_lineas(**lin).model_copy(update=top)  # every family's options (one model runs)


def main() -> None:
    torch.manual_seed(0)
    loaded = pipeline.load(sys.argv[1], log=lambda *a: None)
    base = load_recipe("detox-lineas")
    prompts, neutral = tuning_split(base)  # the hard tuning prompts, the tuning neutral text
    base_tox = HookedProbe(loaded, base, None, prompts, neutral, progress=False).behaviour(0.0)
    print(f"base toxic {base_tox:6.1%}", flush=True)
    for spec in sys.argv[2:]:
        r = variant(base, spec)
        t0 = time.perf_counter()
        maps = pipeline.fit(loaded, r, progress=False, log=lambda *a: None).maps
        fit_s = time.perf_counter() - t0
        probe = HookedProbe(loaded, r, maps, prompts, neutral, progress=False)
        for lam in [float(x) for x in os.environ.get("LAMS", "1").split(",")]:
            tox, cost = probe.behaviour(lam), probe.cost(lam)
            print(
                f"{spec:45s} fit {fit_s:5.0f}s λ={lam} toxic {tox:6.1%} ({base_tox / max(tox, 1e-9):4.1f}x)"
                f" ppl ×{cost['perplexity_ratio']:.3f} KL {cost['kl']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
