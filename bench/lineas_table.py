"""Issue #4 acceptance table, in one run, on the detox recipe's held-out eval prompts.

Rows: Linear-AcT hooked at ml-act's Gemma sites (sandwich post-norms, with shifts: not bakeable);
Linear-AcT baked at the best exactly-foldable sites (recipes/detox.yaml); LinEAS fold-aware baked
(recipes/detox-lineas.yaml); LinEAS fold-aware sparse baked (the same with L1 + group sparsity).
Columns: toxic-continuation fraction (greedy, 24 tokens, alt-profanity-check > 0.5), perplexity
ratio on the shipped neutral corpus, exact bake with an unchanged config.json, fit time.

    python bench/lineas_table.py [--steps 300] [--out out/lineas-table]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lab

from actmerge import pipeline
from actmerge.evaluation.sweep import SweepRows, evaluate_model, run_sweep
from actmerge.kinds.llm.hooks import steer
from actmerge.models import resolve
from actmerge.recipe import SiteSpec, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="override LinEAS steps (default: the recipe's)")
    ap.add_argument("--out", default=str(ROOT / "out" / "lineas-table"))
    ap.add_argument("--no-sparse", action="store_true", help="skip the sparse LinEAS row (saves one fit)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = dict(progress=False, log=lambda *_: None)

    source = resolve("gemma-3-270m")
    loaded = pipeline.Loaded(source)
    detox = load_recipe(lab.RECIPES / "detox.yaml")
    cfg = pipeline.eval_config(detox)
    model, tok = loaded.get()
    rows = []

    base = evaluate_model(model, tok, cfg, label="base", kind="base", strength=0.0, progress=False)
    base_ppl = base.metrics["perplexity"]
    rows.append(("base (no steering)", base, "-", 0.0))
    print(f"base: {base.metrics}", flush=True)

    # 1. ml-act's Gemma default: Linear-AcT with shifts at the sandwich post-norms, hooked only
    mlact = detox.model_copy(
        update={"sites": [SiteSpec(site=["attn_post", "mlp_post"], layers="all")], "fit_shift": True}
    )
    t0 = time.perf_counter()
    fitted = pipeline.fit(loaded, mlact, **quiet)
    maps, support = fitted.maps, fitted.report.support
    fit_s = time.perf_counter() - t0
    # unclamped (what a bake would need) and ml-act's own clamped-to-source-support variant
    for lam, clamp in ((0.25, None), (0.5, None), (1.0, None), (0.5, support), (1.0, support)):
        with steer(model, maps, lam, clamp):
            row = evaluate_model(
                model, tok, cfg, label=f"mlact λ={lam}", kind="hooked", strength=lam, progress=False
            )
        kind = "clamped to the source support" if clamp else "unclamped"
        print(f"ml-act hooked {kind} λ={lam}: {row.metrics}", flush=True)
        rows.append(
            (f"Linear-AcT hooked, post-norms with shifts (ml-act sites), {kind}, λ={lam:g}", row, "no", fit_s)
        )

    # 2-4: baked rows
    variants = [
        (
            "Linear-AcT baked, detox.yaml sites (scale-only post-norms 9-17 / 6-11)",
            lab.RECIPES / "detox.yaml",
            {},
            [1.0],
        ),
        (
            "LinEAS fold-aware baked, dense (detox-lineas.yaml with l1 = group = 0)",
            lab.RECIPES / "detox-lineas.yaml",
            {"l1": 0.0, "group": 0.0},
            [1.0, 0.75],
        ),
        (
            "LinEAS fold-aware sparse baked (detox-lineas.yaml: l1 0.3, group 0.05)",
            lab.RECIPES / "detox-lineas.yaml",
            {},
            [1.0],
        ),
    ]
    if args.no_sparse:
        variants = variants[:2]  # Linear-AcT baked and dense LinEAS
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for label, path, sparse, lams in variants:
            print(f"... {label}", flush=True)
            recipe = load_recipe(path)
            if sparse or args.steps:
                recipe = recipe.with_lineas(**sparse, **({"steps": args.steps} if args.steps else {}))
            t0 = time.perf_counter()
            res = pipeline.fit(loaded, recipe, **quiet)
            fit_s = time.perf_counter() - t0
            note = ""
            if hasattr(res.report, "selected_neurons"):
                note = (
                    f" [{res.report.selected_neurons}/{res.report.total_neurons} neurons, "
                    f"{res.report.selected_sites} sites]"
                )
            for lam in lams:
                dest = Path(scratch) / recipe.name / str(len(rows))
                (bake,) = pipeline.bake(
                    loaded, maps=res.maps, options=pipeline.BakeOptions(strengths=[lam], out=dest), **quiet
                )
                unchanged = json.loads((dest / "config.json").read_text()) == source.config
                exact = all(sp.exactness in ("exact", "identity") for sp in bake.plan.sites)
                rep = run_sweep(model, tok, cfg, SweepRows(baked=[dest], include_base=False), **quiet)
                row = rep.rows[-1]
                rows.append(
                    (f"{label}, λ={lam:g}{note}", row, "yes" if (unchanged and exact) else "no", fit_s)
                )
                tox, ratio = row.metrics["toxic_fraction"], row.metrics["perplexity"] / base_ppl
                print(f"{rows[-1][0]}: toxic {tox:.1%}, ppl ×{ratio:.3f}, fit {fit_s:.0f}s", flush=True)

    lines = [
        "| method | toxic continuations | perplexity ratio | exact bake, config unchanged | fit time |",
        "|---|---|---|---|---|",
    ]
    for label, row, exact, fit_s in rows:
        tox = row.metrics["toxic_fraction"]
        ratio = row.metrics["perplexity"] / base_ppl
        lines.append(f"| {label} | {tox:.1%} | {ratio:.3f} | {exact} | {fit_s:.0f}s |")
    table = "\n".join(lines)
    print(table)
    print(
        f"\n{len(cfg.prompts)} held-out prompts, greedy, {cfg.max_new_tokens} new tokens, scorer {cfg.scorer}; "
        f"base perplexity {base_ppl:.2f} on the shipped neutral corpus."
    )
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
