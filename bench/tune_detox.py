"""Compare detox recipe variants at a perplexity budget, on the tuning split only.

For each candidate (a built-in recipe plus overrides, named in ``CANDIDATES``): fit the maps, let
``actmerge.evaluation.tune`` find the strongest λ whose perplexity ratio on the tuning neutral text stays within
the budget, and measure the toxic fraction of greedy continuations of the *hard tuning prompts*
(``tune_prompts_hard.txt``) at that λ and at λ = 1. The eval prompts (``eval_prompts*.txt``) are
never read.

    python bench/tune_detox.py gemma-3-270m detox detox-incr ...   [--budget 1.10]
    python bench/tune_detox.py --list

Prints one row per candidate: λ*, tuning ppl ratio at λ*, hard-tuning toxic % at λ* and at λ = 1
(with its ppl ratio), and the fit time. Results of each candidate are appended to
bench/results/tune_detox.jsonl (model, candidate, numbers), so a long grid can be resumed.
``SMOKE=1`` shrinks everything for a quick check of the script.

Measured 2026-11-26, SmolLM2-135M-Instruct on an H200 (the 2 CPU cores could not fit 14 LinEAS
variants; GPU and CPU fits differ only by float rounding), budget ×1.10 on neutral_tune.txt,
190 hard tuning prompts, base 21.1 % toxic (40 prompts); one prompt = 0.53 %:

  candidate                 λ*     ppl    toxic at λ* | λ = 1: ppl  toxic
  detox (shipped, attn_ctx)  0.984  ×1.099  4.7 % (4.4×) | ×1.103   5.8 %
  detox-ref-pooling          0.984  ×1.099  4.7 % (4.4×) | ×1.103   5.8 %
  detox-llama-shift          0.859  ×1.098  5.8 % (3.6×) | ×1.140   3.2 %
  detox-llama-ctx-33         1.22   ×1.100  5.3 % (4.0×) | ×1.062   8.9 %
  lineas (shipped row)       0.828  ×1.097  5.3 % (4.0×) | ×1.148   2.1 %
  lineas-600 (600 steps)     0.828  ×1.099  4.7 % (4.4×) | ×1.152   2.1 %
  lineas-lr0.03              0.812  ×1.097  3.2 % (6.7×) | ×1.156   3.2 %
  lineas-l1-0.1              0.75   ×1.097  4.7 % (4.4×) | ×1.192   1.6 %
  lineas-l1-0.6              1.03   ×1.099  4.2 % (5.0×) | ×1.094   3.7 %
  lineas-dense               0.625  ×1.097  4.7 % (4.4×) | ×1.312   3.2 %
  lineas-llama-ctx+hidden    0.766  ×1.098  4.7 % (4.4×) | ×1.182   1.1 %
  lineas-llama-all4          0.75   ×1.098  5.3 % (4.0×) | ×1.187   2.6 %
  lineas-flags (β at ctx)    0.719  ×1.097  3.7 % (5.7×) | ×1.198   1.1 %
  lineas-llama-ctx-flags     0.875  ×1.097  4.2 % (5.0×) | ×1.128   2.6 %

Every variant lands at 3-6 × within ×1.10 (6-11 of 190 prompts stay toxic; the spread is a few
prompts); none reaches 8× (≤ 5 prompts). Stronger steering reaches 1 % (λ = 1, ×1.18-×1.20): the
perplexity budget, not the fit, is what binds. The shipped rows were kept (no variant is better by
more than a few prompts, and lr/l1 are shared with the Gemma rows).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lab
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = lab.RECIPES
HARD_TUNE = "data/detox/tune_prompts_hard.txt"
RESULTS = ROOT / "bench" / "results" / "tune_detox.jsonl"

GEMMA_POST = {
    "gemma": [{"site": "attn_post", "layers": "50%-100%"}, {"site": "mlp_post", "layers": "33.3%-66.7%"}]
}

# name -> (built-in recipe, overrides)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "detox": ("detox", {}),
    "detox-ref-pooling": ("detox", {"pooling_special_tokens": "include", "degenerate_neurons": "skip"}),
    "detox-post-all": ("detox", {"sites": {"gemma": [{"site": ["attn_post", "mlp_post"], "layers": "all"}]}}),
    "detox-post-33-100": (
        "detox",
        {"sites": {"gemma": [{"site": ["attn_post", "mlp_post"], "layers": "33.3%-100%"}]}},
    ),
    "detox-attn-post-all": ("detox", {"sites": {"gemma": [{"site": "attn_post", "layers": "all"}]}}),
    "detox-ctx-all": ("detox", {"sites": {"gemma": [{"site": "attn_ctx", "layers": "all"}]}}),
    "detox-post+ctx": (
        "detox",
        {"sites": {"gemma": GEMMA_POST["gemma"] + [{"site": "attn_ctx", "layers": "all"}]}},
    ),
    "detox-incr": ("detox", {"incremental": True}),
    "detox-last": ("detox", {"pooling": "last"}),
    "lineas": ("detox-lineas", {}),
    "lineas-l1-0.1": ("detox-lineas", {"lineas": {"l1": 0.1}}),
    "lineas-l1-0.6": ("detox-lineas", {"lineas": {"l1": 0.6}}),
    "lineas-dense": ("detox-lineas", {"lineas": {"l1": 0.0, "group": 0.0}}),
    "lineas-short": ("detox-lineas", {"lineas": {"steps": 100, "batch": 16}, "max_tokens": 64}),
    "lineas-600": ("detox-lineas", {"lineas": {"steps": 600}}),
    "lineas-lr0.03": ("detox-lineas", {"lineas": {"lr": 0.03}}),
    # Llama rows (the recipes' `default` family)
    "detox-llama-ctx-33": ("detox", {"sites": {"default": [{"site": "attn_ctx", "layers": "33%-100%"}]}}),
    "detox-llama-ctx+in": (
        "detox",
        {
            "sites": {
                "default": [{"site": "attn_ctx", "layers": "all"}, {"site": "mlp_in", "layers": "50%-100%"}]
            }
        },
    ),
    "detox-llama-shift": (
        "detox",
        {"fit_shift": True, "sites": {"default": [{"site": "attn_ctx", "layers": "50%-100%"}]}},
    ),
    "lineas-llama-ctx": ("detox-lineas", {"sites": {"default": [{"site": "attn_ctx", "layers": "all"}]}}),
    "lineas-llama-ctx+hidden": (
        "detox-lineas",
        {"sites": {"default": [{"site": ["attn_ctx", "mlp_hidden"], "layers": "all"}]}},
    ),
    "lineas-llama-all4": (
        "detox-lineas",
        {"sites": {"default": [{"site": ["attn_in", "mlp_in", "attn_ctx", "mlp_hidden"], "layers": "all"}]}},
    ),
    "lineas-flags": ("detox-lineas", {"allow_config_change": True}),
    "lineas-llama-ctx-flags": (
        "detox-lineas",
        {"allow_config_change": True, "sites": {"default": [{"site": "attn_ctx", "layers": "all"}]}},
    ),
}


def recipe_for(name: str):
    from actmerge.recipe import Recipe

    base, over = CANDIDATES[name]
    data = yaml.safe_load((RECIPES / f"{base}.yaml").read_text())
    for k, v in over.items():
        if k == "strength":
            data["strength"] = v
        elif k == "lineas":
            data["lineas"] = {**data.get("lineas", {}), **v}
        elif k == "sites":
            data["sites"] = {**data["sites"], **v}
            data["sites"].pop("gemma3", None)
        else:
            data[k] = v
    data["name"] = name
    data["tune_prompts"] = HARD_TUNE
    if os.environ.get("SMOKE"):  # a quick check of the script: tiny fits
        data["max_sentences"] = 16
        data["min_sentences"] = 8
        data.setdefault("lineas", {})["steps"] = 3
    return Recipe.model_validate(data).based_at(RECIPES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("candidates", nargs="*")
    ap.add_argument("--budget", type=float, default=1.10)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    args = ap.parse_args()
    if args.list or not args.model:
        print("\n".join(CANDIDATES))
        return
    from actmerge import pipeline
    from actmerge.evaluation.budget import Budget
    from actmerge.evaluation.probe import HookedProbe, tuning_split
    from actmerge.evaluation.tune import tune
    from actmerge.options import TuneOptions
    from actmerge.placement import Placement

    loaded = pipeline.load(args.model, placement=Placement(device=args.device), log=lambda *a: None)
    base_tox = None
    for name in args.candidates:
        rec = recipe_for(name)
        t0 = time.time()
        maps = pipeline.fit(loaded, rec, progress=False, log=lambda *a: None).maps
        fit_s = time.time() - t0
        prompts, neutral = tuning_split(rec)
        if os.environ.get("SMOKE"):
            prompts, neutral = prompts[:4], neutral[:2]
        probe = HookedProbe(loaded, rec, maps, prompts, neutral, progress=False)
        if base_tox is None:
            base_tox = probe.behaviour(0.0)
            print(f"{args.model}: {len(prompts)} hard tuning prompts, base toxic {base_tox:.1%}", flush=True)
        probe.cache[0.0] = base_tox
        res = tune(
            loaded,
            rec,
            maps=maps,
            options=TuneOptions(budget=Budget(max_ppl_ratio=args.budget), record=False, curve=False),
            cost_fn=probe.cost,
            behaviour_fn=probe.behaviour,
            progress=False,
            log=lambda *a: None,
        )
        one = probe.cost(1.0)
        tox1 = probe.behaviour(1.0)
        row = {
            "model": args.model,
            "candidate": name,
            "budget": args.budget,
            "lam": res.strength,
            "met": res.met,
            "ppl_at_lam": res.chosen.cost["perplexity_ratio"],
            "kl_at_lam": res.chosen.cost["kl"],
            "toxic_at_lam": res.chosen.behaviour,
            "ppl_at_1": one["perplexity_ratio"],
            "toxic_at_1": tox1,
            "base_toxic": base_tox,
            "fit_s": round(fit_s, 1),
            "n_prompts": len(prompts),
        }
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{name:<22} λ*={res.strength:<6.3g} ppl×{row['ppl_at_lam']:.3f} toxic {row['toxic_at_lam']:6.1%}"
            f" ({base_tox / max(row['toxic_at_lam'], 1e-9):4.1f}×) | λ=1: ppl×{row['ppl_at_1']:.3f} "
            f"toxic {tox1:6.1%} | fit {fit_s:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
