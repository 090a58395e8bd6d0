"""Compare detox recipe variants at a perplexity budget, on the tuning split only.

For each candidate (a built-in recipe plus overrides, named in ``CANDIDATES``): fit the maps, let
``actmerge.tune`` find the strongest λ whose perplexity ratio on the tuning neutral text stays within
the budget, and measure the toxic fraction of greedy continuations of the *hard tuning prompts*
(``tune_prompts_hard.txt``) at that λ and at λ = 1. The eval prompts (``eval_prompts*.txt``) are
never read.

    python bench/tune_detox.py gemma-3-270m detox detox-incr ...   [--budget 1.10]
    python bench/tune_detox.py --list

Prints one row per candidate: λ*, tuning ppl ratio at λ*, hard-tuning toxic % at λ* and at λ = 1
(with its ppl ratio), and the fit time. Results of each candidate are appended to
bench/results/tune_detox.jsonl (model, candidate, numbers), so a long grid can be resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's actmerge

import yaml  # noqa: E402

RECIPES = ROOT / "actmerge" / "recipes"
HARD_TUNE = "data/detox/tune_prompts_hard.txt"
RESULTS = ROOT / "bench" / "results" / "tune_detox.jsonl"

GEMMA_POST = {"gemma": [{"site": "attn_post", "layers": "50%-100%"}, {"site": "mlp_post", "layers": "33.3%-66.7%"}]}

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
}


def recipe_for(name: str):
    from actmerge.recipe import Recipe

    base, over = CANDIDATES[name]
    data = yaml.safe_load((RECIPES / f"{base}.yaml").read_text())
    for k, v in over.items():
        if k == "lineas":
            data["lineas"] = {**data.get("lineas", {}), **v}
        elif k == "sites":
            data["sites"] = {**data["sites"], **v}
            data["sites"].pop("gemma3", None)
        else:
            data[k] = v
    data["name"] = name
    data["tune_prompts"] = HARD_TUNE
    rec = Recipe.model_validate(data)
    rec._base_dir = RECIPES
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("candidates", nargs="*")
    ap.add_argument("--budget", type=float, default=1.10)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.model:
        print("\n".join(CANDIDATES))
        return
    from actmerge import pipeline
    from actmerge.tune import Budget, HookedProbe, tune, tuning_split

    loaded = pipeline.load(args.model, log=lambda *a: None)
    base_tox = None
    for name in args.candidates:
        rec = recipe_for(name)
        t0 = time.time()
        maps = pipeline.fit(loaded, rec, progress=False, log=lambda *a: None).maps
        fit_s = time.time() - t0
        prompts, neutral = tuning_split(rec)
        probe = HookedProbe(loaded, rec, maps, prompts, neutral, progress=False)
        if base_tox is None:
            base_tox = probe.behaviour(0.0)
            print(f"{args.model}: {len(prompts)} hard tuning prompts, base toxic {base_tox:.1%}", flush=True)
        probe.cache[0.0] = base_tox
        res = tune(
            loaded,
            rec,
            maps=maps,
            budget=Budget(max_ppl_ratio=args.budget),
            cost_fn=probe.cost,
            behaviour_fn=probe.behaviour,
            record=False,
            curve=False,
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
