"""Choose SmolLM2-135M-Instruct's football settings (chat) at a perplexity budget, on the tuning split
only, and only then measure the held-out row of the pick.

    python bench/tune_football_chat.py tune OUT.json r1 r2   # tuning rows (appended to OUT.json)
    python bench/tune_football_chat.py table OUT.json        # the table (results/tune_football_chat.txt)

Every candidate is a *direction* (method, sites, layer fraction, fitting sentences, pooling); its
strength is set by the budget, not guessed: the largest measured λ whose perplexity ratio on the
tuning neutral text (data/neutral_tune.txt) stays within ×TARGET (default 1.25, a margin under the
acceptance's ×1.3), found by the library's search (``lab.strongest``: ``actmerge.evaluation.search.search``, grid
step 0.5 up to 16, then bisection to 0.02). (The recorded rows were found with the same rule by a
bench-side search — λ = 1 and 2, log(ratio) ≈ aλ + bλ² solved for the target, two secant steps; the
first row, attn_ctx 33-100 %, by grid + bisection.) At that λ the model answers the 60 neutral
chat requests of data/concept/chat_tune_prompts.txt (user turns of the chat template, greedy, 32
tokens), scored for football mentions (the recipe's keywords) and MiniLM similarity to the unsteered
reply. So every row of the table spends the same perplexity and the directions compare on mentions.
Rounds r1-r2 chose the former row; r3-r8 (sparse maps, LinEAS, incremental Mean-AcT, two sites at
once, sentences as replies to the fit-only requests of data/concept/chat_fit_prompts.txt,
chat-shaped paired replies) found nothing better (results/tune_football_chat.txt); the shipped row
since comes from bench/football_chat_probes.py instruction (chat_fit: instruction).
One process loads the model once and loops over the candidates (about 4-7 min each on 2 busy CPU
cores; the fitted maps are cached in $STATS_DIR, default /tmp, by recipe hash: ``lab.fit``). The held-out row of the pick
is measured once, afterwards, with the shipped recipe (README):
    actmerge eval smollm2-135m --recipe football.yaml --chat --metrics concept,similarity,perplexity
        --prompts recipes/data/concept/chat_eval_prompts.txt --strengths 0.53 -o out/eval-football-smollm2
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lab
import torch

from actmerge.chat import replies_to
from actmerge.estimators import linear_act, mean_act
from actmerge.kinds.llm.collect import collect
from actmerge.recipe import LineasOptions, SiteSpec
from actmerge.sites import resolve_sites

DATA = lab.DATA
TARGET = float(os.environ.get("TARGET", "1.25"))

# label: (method, [sites], layer fraction, chat_fit, pooling, target file[, top_neurons fraction |
# lineas options])
ROUNDS: dict[str, dict[str, tuple]] = {
    "r1": {  # sites × layer fractions, mean_act, assistant turns (today's recipe is the first)
        "mean attn_ctx 33-100": ("mean_act", ["attn_ctx"], "33%-100%", "assistant", "mean", None),
        "mean mlp_in 33-100": ("mean_act", ["mlp_in"], "33%-100%", "assistant", "mean", None),
        "mean attn_in 33-100": ("mean_act", ["attn_in"], "33%-100%", "assistant", "mean", None),
        "linear attn_ctx 33-100": ("linear_act", ["attn_ctx"], "33%-100%", "assistant", "mean", None),
        "mean attn_ctx 0-50": ("mean_act", ["attn_ctx"], "0%-50%", "assistant", "mean", None),
        "mean attn_ctx 50-100": ("mean_act", ["attn_ctx"], "50%-100%", "assistant", "mean", None),
        "mean mlp_hidden 33-100": ("mean_act", ["mlp_hidden"], "33%-100%", "assistant", "mean", None),
        "mean attn_ctx 33-100 last": ("mean_act", ["attn_ctx"], "33%-100%", "assistant", "last", None),
    },
    "r2": {  # round 1's best sites (attn_in, attn_ctx): layer fractions and the pair
        "mean attn_in all": ("mean_act", ["attn_in"], "all", "assistant", "mean", None),
        "mean attn_in 50-100": ("mean_act", ["attn_in"], "50%-100%", "assistant", "mean", None),
        "mean attn_in+attn_ctx 33-100": (
            "mean_act",
            ["attn_in", "attn_ctx"],
            "33%-100%",
            "assistant",
            "mean",
            None,
        ),
        "mean attn_in 0-50": ("mean_act", ["attn_in"], "0%-50%", "assistant", "mean", None),
    },
    "r3": {  # the two best rows, sparsified (recipe key top_neurons): the largest mean differences only
        f"mean {site} 33-100 top {top}": ("mean_act", [site], "33%-100%", "assistant", "mean", None, top)
        for site in ("attn_in", "attn_ctx")
        for top in (0.1, 0.25)
    },
    "r4": {  # LinEAS (end to end: the maps compensate each other across layers), fold-aware with flags
        "lineas attn_in 33-100 s40": ("lineas", ["attn_in"], "33%-100%", "assistant", "mean", None, {}),
    },
    "r5": {  # incremental Mean-AcT: each layer's shift measured with the earlier shifts active
        "mean attn_in 33-100 incr": ("mean_act", ["attn_in"], "33%-100%", "assistant", "mean", None, "incr"),
    },
    "r6": {  # fitting sentences as the assistant's replies to a user request (fit-only requests, paired)
        "mean attn_in 33-100 reply": ("mean_act", ["attn_in"], "33%-100%", "reply", "mean", None),
        "mean attn_ctx 33-100 reply": ("mean_act", ["attn_ctx"], "33%-100%", "reply", "mean", None),
    },
    "r7": {  # chat-shaped sentences: replies to everyday requests, the football ones bring football in
        "mean attn_in 33-100 chat data": (
            "mean_act",
            ["attn_in"],
            "33%-100%",
            "assistant",
            "mean",
            ["chat_other.txt", "chat_football.txt"],
        ),
        "mean attn_ctx 33-100 chat data": (
            "mean_act",
            ["attn_ctx"],
            "33%-100%",
            "assistant",
            "mean",
            ["chat_other.txt", "chat_football.txt"],
        ),
    },
    "r8": {  # two mechanisms at once: the pre-attention shift with an MLP-hidden or attention-context shift
        "mean attn_in+mlp_hidden 33-100": (
            "mean_act",
            ["attn_in", "mlp_hidden"],
            "33%-100%",
            "assistant",
            "mean",
            None,
        ),
        "mean attn_in+mlp_in 33-100": (
            "mean_act",
            ["attn_in", "mlp_in"],
            "33%-100%",
            "assistant",
            "mean",
            None,
        ),
    },
}
FIT_PROMPTS = Path(os.environ.get("FIT_PROMPTS", DATA / "concept" / "chat_fit_prompts.txt"))
LINEAS = {"steps": 40, "lr": 0.05, "batch": 32, "loss_norm": "target_var", "group_mode": "joint"}
# these rounds fit the sentences as assistant turns (the recipe now fits an instruction's effect)
ASSISTANT = {"chat_fit": "assistant", "instruction": None, "chat_requests": None}


def maps_for(b: lab.ChatLab, spec: tuple) -> dict:
    """A row's maps: football.yaml with the row's method, sites, layers, pooling, sentences and options,
    fitted by the library (``lab.fit``: ``pipeline.fit``, maps cached by recipe hash); the ``reply``
    rows (r6, a probe that did not ship) by ``reply_maps``."""
    method, names, frac, fit, pooling, target, *extra = spec
    if fit == "reply":
        return reply_maps(b, method, names, frac, pooling)
    update = {**ASSISTANT, "sites": [SiteSpec(site=names, layers=frac)], "method": method, "pooling": pooling}
    if method == "lineas":
        update.update(max_tokens=64, lineas=LineasOptions(**LINEAS, **extra[0]))
    elif extra == ["incr"]:
        update["incremental"] = True
    elif extra:
        update["top_neurons"] = extra[0]
    if isinstance(target, list):  # [source file, target file] in data/concept
        update["source"], update["target"] = (DATA / "concept" / f for f in target)
    elif target:
        update["target"] = DATA / "concept" / target
    return b.fit(**update)


def reply_maps(b: lab.ChatLab, method: str, names: list[str], frac: str, pooling: str) -> dict:
    """Each sentence as the assistant's reply to a user request (the i-th sentence of source and target
    get the same request: other.txt and football.txt are line-aligned), pooled on the reply; the
    recipe's pooling options (special tokens out, 128 tokens, degenerate neurons shifted, every row)."""
    requests = lab.read(FIT_PROMPTS)
    keys = [s.key for s in resolve_sites(b.arch, b.config, names, frac)]
    xs, ys = (
        collect(
            b.model,
            b.tok,
            replies_to(b.tok, requests, s),
            keys,
            pooling=pooling,
            skip_special=True,
            max_tokens=128,
            progress=False,
        )
        for s in (b.recipe.read_source(), b.recipe.read_target())
    )
    est = {"mean_act": mean_act, "linear_act": linear_act}[method]
    return {k: est(xs[k], ys[k], degenerate="shift", sample="all")[0] for k in keys}


def tune(out: Path, *rounds: str) -> None:
    torch.manual_seed(0)
    b = lab.ChatLab(TARGET)
    res = json.loads(out.read_text()) if out.exists() else {"target": TARGET, "rows": {}}
    if "base" not in res:
        t0 = time.perf_counter()
        res["base"] = {"ppl": b.ppl({}, 0.0), "tune": b.gen({}, 0.0, b.tune_prompts)}
        res["base"]["concept"] = lab.score(res["base"]["tune"], res["base"]["tune"], b.keywords)[0]
        print(f"base: concept {res['base']['concept']:.1%} ({time.perf_counter() - t0:.0f}s)", flush=True)
        out.write_text(json.dumps(res, indent=1))
    base = res["base"]
    for rnd in rounds:
        for label, spec in ROUNDS[rnd].items():
            if label in res["rows"]:
                continue
            t0 = time.perf_counter()
            maps = maps_for(b, spec)
            lam, ratio = b.strongest(maps, base["ppl"])
            texts = b.gen(maps, lam, b.tune_prompts)
            concept, sim = lab.score(texts, base["tune"], b.keywords)
            res["rows"][label] = {
                "spec": spec,
                "strength": lam,
                "ppl_ratio": ratio,
                "concept": concept,
                "sim": sim,
                "tune": texts,
                "seconds": time.perf_counter() - t0,
            }
            out.write_text(json.dumps(res, indent=1))
            print(
                f"{label:34s} λ {lam:5.2f}  concept {concept:6.1%}  sim {sim:.3f}  ppl ×{ratio:.3f}"
                f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )


def table(out: Path) -> None:
    res = json.loads(out.read_text())
    print(f"tuning split: {len(res['base']['tune'])} chat requests; λ = largest with ppl ≤ ×{res['target']}")
    print(f"{'base':34s} λ  0.00  concept {res['base']['concept']:6.1%}")
    for label, r in sorted(res["rows"].items(), key=lambda kv: -kv[1]["concept"]):
        print(
            f"{label:34s} λ {r['strength']:5.2f}  concept {r['concept']:6.1%}  sim {r['sim']:.3f}  "
            f"ppl ×{r['ppl_ratio']:.3f}"
        )


if __name__ == "__main__":
    cmd, path, *rest = sys.argv[1:]
    {"tune": tune, "table": table}[cmd](Path(path), *rest)
