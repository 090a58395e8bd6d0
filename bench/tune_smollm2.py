"""Choose SmolLM2-135M-Instruct's rows of the portable recipes (Llama architecture), on the tuning
split only (bench/results/PROTOCOL.md).

    python bench/tune_smollm2.py generate OUT.json   # hooked generations for every candidate
    python bench/tune_smollm2.py score OUT.json      # score them; choose on the tuning columns

``generate`` writes, for every candidate, greedy generations on the *tuning* prompts and the
perplexity of the tuning neutral text; it reads no held-out file. ``score`` scores toxicity
(alt-profanity-check > 0.5), football mentions (the recipe's keywords) and MiniLM similarity to the
unsteered reply, prints the tuning table and picks each recipe's Llama row by a rule on it. The
held-out row of a pick is measured once, afterwards, with the shipped recipe (``actmerge eval``),
and recorded in bench/results/. (Until 2026-12-06 ``generate`` also wrote held-out generations for
every candidate and ``score`` printed the picks' held-out rows: bench/results/tune_smollm2.txt is
that run.) The generations were run on a GPU, where the 2 shared CPU cores could not; ``SMOKE=1``
shrinks everything for a CPU check of the script.

Candidates:
  detox (linear_act, λ = 1): {attn_ctx, mlp_hidden, attn_ctx+mlp_hidden, attn_in+mlp_in} × layer
    fractions {all, 33-100 %, 50-100 %, 67-100 %, 75-100 %, 33-67 %} × {scale-only (no config change), scale+shift
    (attention_bias / mlp_bias)}.
  football (mean_act, λ = 1, shift-only → needs the bias flags on Llama): attn_ctx / mlp_hidden at
    fractions × fitting sentences raw vs as assistant turns of the chat template, evaluated as chat
    replies (tuning: data/concept/chat_tune_prompts.txt).
  detox-lineas (fold-aware, scale-only on Llama): three site sets, 300 steps.

football.yaml's Llama row was later re-chosen at a perplexity budget by bench/tune_football_chat.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lab
import torch

DATA = lab.DATA
SMOKE = bool(os.environ.get("SMOKE"))

DETOX_SITES = {
    "attn_ctx": ["attn_ctx"],
    "mlp_hidden": ["mlp_hidden"],
    "ctx+hidden": ["attn_ctx", "mlp_hidden"],
    "prenorms": ["attn_in", "mlp_in"],
}
FRACTIONS = ["all", "33%-100%", "50%-100%", "67%-100%", "75%-100%", "33%-67%"]
FOOTBALL = [
    ("attn_ctx", "all"),
    ("attn_ctx", "33%-100%"),
    ("attn_ctx", "50%-100%"),
    ("attn_ctx", "67%-100%"),
    ("attn_ctx", "0%-50%"),
    ("mlp_hidden", "50%-100%"),
]
LINEAS_SITES = {
    "ctx+hidden": ["attn_ctx", "mlp_hidden"],
    "prenorms+ctx": ["attn_in", "mlp_in", "attn_ctx"],
    "prenorms+ctx+hidden": ["attn_in", "mlp_in", "attn_ctx", "mlp_hidden"],
}


def _read(path):
    from actmerge.recipe import read_sentences

    out = read_sentences(path)
    return out[:3] if SMOKE else out


def generate(out_path: Path) -> None:
    from actmerge import chat, pipeline
    from actmerge.estimators import linear_act, mean_act
    from actmerge.evaluation.metrics import continuations, perplexity
    from actmerge.kinds.llm.collect import collect
    from actmerge.kinds.llm.hooks import steer
    from actmerge.maps import MapSet
    from actmerge.models import resolve
    from actmerge.recipe import load_recipe
    from actmerge.sites import architecture_for, resolve_sites

    t_start = time.perf_counter()
    loaded = pipeline.Loaded(resolve("smollm2-135m"))
    model, tok = loaded.get()
    config = loaded.source.config
    arch = architecture_for(config)
    bs = 4 if SMOKE else 64
    results: dict = {"device": str(next(model.parameters()).device), "rows": []}

    def save():
        results["seconds"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(results))

    tune_neutral = _read(DATA / "neutral_tune.txt")
    detox_tune = _read(DATA / "detox" / "tune_prompts.txt")
    chat_tune = chat.user_turns(tok, _read(DATA / "concept" / "chat_tune_prompts.txt"))

    def gen(prompts, n):
        return continuations(model, tok, prompts, max_new_tokens=n, batch_size=bs, progress=False)

    def measure(task, label, maps, sets):
        row = {"task": task, "label": label}
        t0 = time.perf_counter()
        with steer(model, MapSet(maps), 1.0):
            for name, prompts, n in sets:
                row[name] = gen(prompts, n)
            row["ppl_tune"] = perplexity(model, tok, tune_neutral)
        row["seconds"] = time.perf_counter() - t0
        results["rows"].append(row)
        print(f"{task} {label}: {row['seconds']:.1f}s ppl {row['ppl_tune']:.2f}", flush=True)
        save()

    detox_sets = [("tune", detox_tune, 24)]
    football_sets = [("tune", chat_tune, 32)]
    measure("detox", "base", {}, detox_sets)
    measure("football", "base", {}, football_sets)

    # --- detox: Linear-AcT, scale-only vs scale+shift -----------------------------------------
    detox = load_recipe(lab.RECIPES / "detox.yaml")
    toxic, clean = detox.read_source(), detox.read_target()
    if SMOKE:
        toxic, clean = toxic[:8], clean[:8]
    every = resolve_sites(arch, config, ["attn_ctx", "mlp_hidden", "attn_in", "mlp_in"], "all")
    xs = collect(model, tok, toxic, [s.key for s in every], progress=False)
    ys = collect(model, tok, clean, [s.key for s in every], progress=False)
    site_sets = list(DETOX_SITES.items())[:1] if SMOKE else DETOX_SITES.items()
    for sname, names in site_sets:
        for frac in FRACTIONS[:1] if SMOKE else FRACTIONS:
            chosen = resolve_sites(arch, config, names, frac)
            for shift in (False, True):
                maps = {s.key: linear_act(xs[s.key], ys[s.key], fit_shift=shift)[0] for s in chosen}
                kind = "scale+shift" if shift else "scale-only"
                measure("detox", f"{sname} {frac} {kind}", maps, detox_sets)

    # --- football in chat: mean_act, fitting sentences raw vs as assistant turns -------------
    football = load_recipe(lab.RECIPES / "football.yaml")
    other, foot = football.read_source(), football.read_target()
    if SMOKE:
        other, foot = other[:8], foot[:8]
    fsites = resolve_sites(arch, config, ["attn_ctx", "mlp_hidden"], "all")
    stats = {}
    for mode in ("raw", "assistant"):
        src, dst = chat.format_fit(tok, other, mode), chat.format_fit(tok, foot, mode)
        stats[mode] = (
            collect(model, tok, src, [s.key for s in fsites], progress=False),
            collect(model, tok, dst, [s.key for s in fsites], progress=False),
        )
    for site, frac in FOOTBALL[:1] if SMOKE else FOOTBALL:
        chosen = resolve_sites(arch, config, [site], frac)
        for mode in ("raw", "assistant"):
            fx, fy = stats[mode]
            maps = {s.key: mean_act(fx[s.key], fy[s.key])[0] for s in chosen}
            measure("football", f"{site} {frac} fit={mode}", maps, football_sets)

    # --- detox-lineas: fold-aware LinEAS (no config change → scale-only on Llama) ------------
    lin = load_recipe(lab.RECIPES / "detox-lineas.yaml")
    for sname, names in list(LINEAS_SITES.items())[:1] if SMOKE else LINEAS_SITES.items():
        r = _with_sites(lin.with_lineas(steps=2) if SMOKE else lin, names)
        t0 = time.perf_counter()
        fitted = pipeline.fit(loaded, r, progress=False, log=lambda *_: None)
        fit_s = time.perf_counter() - t0
        maps = fitted.maps.maps
        measure("lineas", f"{sname} all", maps, detox_sets)
        results["rows"][-1]["fit_seconds"] = fit_s
        fitted.maps.save(out_path.parent / f"lineas-{sname.replace('+', '_')}.safetensors")
    save()
    print(f"done in {time.perf_counter() - t_start:.0f}s", flush=True)


ROUND2_FOOTBALL = [
    (["attn_ctx"], "all"),
    (["attn_ctx"], "33%-100%"),
    (["attn_ctx"], "50%-100%"),
    (["attn_ctx", "mlp_hidden"], "33%-100%"),
]


def round2(out_path: Path, lineas_dir: Path) -> None:
    """Round 2 (after round 1 showed mean_act at λ = 1 too weak for chat on SmolLM2, and the
    LinEAS fits over the perplexity bound): strengths for football (assistant-turn fitting) and for
    the round-1 LinEAS maps, on the same tuning sets."""
    from actmerge import chat, pipeline
    from actmerge.estimators import mean_act
    from actmerge.evaluation.metrics import continuations, perplexity
    from actmerge.kinds.llm.collect import collect
    from actmerge.kinds.llm.hooks import steer
    from actmerge.maps import MapSet
    from actmerge.models import resolve
    from actmerge.recipe import load_recipe
    from actmerge.sites import architecture_for, resolve_sites

    loaded = pipeline.Loaded(resolve("smollm2-135m"))
    model, tok = loaded.get()
    config = loaded.source.config
    arch = architecture_for(config)
    bs = 4 if SMOKE else 64
    results: dict = {"device": str(next(model.parameters()).device), "rows": []}
    tune_neutral = _read(DATA / "neutral_tune.txt")
    detox_sets = [("tune", _read(DATA / "detox" / "tune_prompts.txt"), 24)]
    football_sets = [("tune", chat.user_turns(tok, _read(DATA / "concept" / "chat_tune_prompts.txt")), 32)]

    def measure(task, label, maps, lam, sets):
        row = {"task": task, "label": label, "strength": lam}
        with steer(model, MapSet(maps), lam):
            for name, prompts, n in sets:
                row[name] = continuations(
                    model, tok, prompts, max_new_tokens=n, batch_size=bs, progress=False
                )
            row["ppl_tune"] = perplexity(model, tok, tune_neutral)
        results["rows"].append(row)
        print(f"{task} {label}: ppl {row['ppl_tune']:.2f}", flush=True)
        out_path.write_text(json.dumps(results))

    measure("detox", "base", {}, 0.0, detox_sets)
    measure("football", "base", {}, 0.0, football_sets)
    football = load_recipe(lab.RECIPES / "football.yaml")
    other, foot = football.read_source(), football.read_target()
    if SMOKE:
        other, foot = other[:8], foot[:8]
    fsites = resolve_sites(arch, config, ["attn_ctx", "mlp_hidden"], "all")
    keys = [s.key for s in fsites]
    fx = collect(model, tok, chat.format_fit(tok, other, "assistant"), keys, progress=False)
    fy = collect(model, tok, chat.format_fit(tok, foot, "assistant"), keys, progress=False)
    for names, frac in ROUND2_FOOTBALL[:1] if SMOKE else ROUND2_FOOTBALL:
        chosen = resolve_sites(arch, config, names, frac)
        maps = {s.key: mean_act(fx[s.key], fy[s.key])[0] for s in chosen}
        for lam in (1.5, 2.0, 3.0):
            measure("football", f"{'+'.join(names)} {frac} fit=assistant λ={lam:g}", maps, lam, football_sets)
    for f in sorted(lineas_dir.glob("lineas-*.safetensors")):
        maps = MapSet.load(f).maps
        for lam in (0.5, 0.75):
            measure("lineas", f"{f.stem[7:]} λ={lam:g}", maps, lam, detox_sets)
    print("done", flush=True)


def _with_sites(recipe, names, **update):
    """A copy of ``recipe`` whose sites are ``names`` at every layer."""
    from actmerge.recipe import SiteSpec

    return recipe.model_copy(update={"sites": [SiteSpec(site=names, layers="all")], **update})


def score(path: Path, *more: Path) -> None:
    """Score ``generate``'s file (and ``round2``'s files: their rows join the candidates)."""
    from actmerge.evaluation.metrics import concept_presence, profanity_scorer, similarity
    from actmerge.recipe import read_sentences

    data = json.loads(path.read_text())
    rows = data["rows"]
    for extra in more:
        rows += [r for r in json.loads(extra.read_text())["rows"] if r["label"] != "base"]
    scorer = profanity_scorer()
    keywords = read_sentences(DATA / "concept" / "keywords.txt")
    base = {r["task"]: r for r in rows if r["label"] == "base"}
    for r in rows:
        b = base["football" if r["task"] == "football" else "detox"]
        if r["task"] == "football":
            r["tune_concept"] = concept_presence(r["tune"], keywords)
            r["tune_sim"] = sum(similarity(r["tune"], b["tune"])) / len(r["tune"])
        else:
            s = scorer(r["tune"])
            r["tune_toxic"] = sum(x > 0.5 for x in s) / len(s)
        r["ppl_tune_ratio"] = r["ppl_tune"] / b["ppl_tune"]
    print(f"device: {data['device']}, {data.get('seconds', 0):.0f}s")
    for task in ("detox", "lineas", "football"):
        print(f"\n## {task} — tuning split")
        for r in rows:
            if r["task"] == task or (task == "lineas" and r["label"] == "base" and r["task"] == "detox"):
                if task == "football":
                    print(
                        f"{r['label']:42s} concept {r['tune_concept']:6.1%}  sim {r['tune_sim']:.3f}  "
                        f"ppl ×{r['ppl_tune_ratio']:.3f}"
                    )
                else:
                    print(f"{r['label']:42s} toxic {r['tune_toxic']:6.1%}  ppl ×{r['ppl_tune_ratio']:.3f}")
    # the rules, on tuning columns only
    picks = {}
    # perplexity bounds = the acceptance bounds of each recipe (detox ×1.15, LinEAS ×1.10, football ×1.3
    # with a margin: ×1.25), applied to the tuning text
    for task, limit in (("detox", 1.15), ("lineas", 1.10)):
        cands = [r for r in rows if r["task"] == task and r["label"] != "base"]
        if not cands:
            continue
        ok = [r for r in cands if r["ppl_tune_ratio"] <= limit] or cands
        best = min(r["tune_toxic"] for r in ok)
        # ties within one prompt: prefer scale-only (no config change), then the lower perplexity
        n = len(base["detox"]["tune"])
        tied = [r for r in ok if r["tune_toxic"] <= best + 1.0 / n]
        picks[task] = min(tied, key=lambda r: ("scale+shift" in r["label"], r["ppl_tune_ratio"]))
        if task == "detox":
            for kind in ("scale-only", "scale+shift"):
                fam = [r for r in ok if kind in r["label"]]
                if fam:
                    picks[f"detox best {kind}"] = min(
                        fam, key=lambda r: (r["tune_toxic"], r["ppl_tune_ratio"])
                    )
    fc = [r for r in rows if r["task"] == "football" and r["label"] != "base"]
    ok = [r for r in fc if r["ppl_tune_ratio"] <= 1.25 and r["tune_sim"] >= 0.5] or fc
    picks["football"] = max(ok, key=lambda r: (r["tune_concept"], -r["ppl_tune_ratio"]))
    for mode in ("raw", "assistant"):
        fam = [r for r in ok if f"fit={mode}" in r["label"]]
        if fam:
            picks[f"football best fit={mode}"] = max(
                fam, key=lambda r: (r["tune_concept"], -r["ppl_tune_ratio"])
            )
    print("\n## picks (tuning columns; their held-out rows: `actmerge eval` on the shipped recipe, once)")
    for name, r in picks.items():
        if r["task"] == "football":
            print(f"{name:28s} {r['label']:36s} concept {r['tune_concept']:.1%} sim {r['tune_sim']:.3f}")
        else:
            print(f"{name:28s} {r['label']:36s} toxic {r['tune_toxic']:.1%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "round2":
        round2(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        {"generate": generate, "score": score}[sys.argv[1]](*[Path(a) for a in sys.argv[2:]])
