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

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import os  # noqa: E402

from actmerge.collect import collect  # noqa: E402
from actmerge.estimators import ESTIMATORS  # noqa: E402
from actmerge.evaluate import perplexity, profanity_scorer, toxicity  # noqa: E402
from actmerge.hooks import steer  # noqa: E402
from actmerge.maps import AffineMap, MapSet  # noqa: E402
from actmerge.models import load_model, resolve  # noqa: E402
from actmerge.recipe import read_sentences  # noqa: E402
from actmerge.sites import architecture_for, resolve_sites  # noqa: E402

DATA = ROOT / "recipes" / "data"


def sparse(m: AffineMap, frac: float, rms: torch.Tensor | None = None) -> AffineMap:
    """Keep the top ``frac`` neurons by |log ω| (or, given ``rms``, by displacement |ω − 1|·rms)."""
    if frac >= 1:
        return m
    w = m.omega.clone()
    d = w.clamp_min(1e-6).log().abs() if rms is None else (w - 1).abs() * rms
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[d.topk(max(1, round(frac * len(w)))).indices] = True
    return AffineMap(torch.where(keep, w, torch.ones_like(w)), m.beta * keep)


def main() -> None:
    torch.manual_seed(0)
    src = resolve(sys.argv[1])
    model, tok = load_model(src)
    arch = architecture_for(src.config)
    toxic = read_sentences(DATA / "detox" / "toxic.txt")[:256]
    clean = read_sentences(DATA / "detox" / "nontoxic.txt")[:256]
    prompts = read_sentences(DATA / "detox" / "tune_prompts_hard.txt")
    neutral = read_sentences(DATA / "neutral_tune.txt")
    scorer = profanity_scorer()
    specs = []
    for arg in sys.argv[2:]:
        spec, fracs = arg.split(":")
        parts = []
        for p in spec.split("+"):
            name, layers = p.split("@")
            parts += resolve_sites(arch, src.config, [name], layers)
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
    t0 = time.perf_counter()
    base = toxicity(model, tok, prompts, scorer, progress=False)
    bppl = perplexity(model, tok, neutral)
    print(f"base toxic {base.fraction:6.1%} ppl {bppl:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    for spec, sites, fracs in specs:
        for f, rank in fracs:
            ms = MapSet({s.key: sparse(fitted[s.key], f, rms[s.key] if rank == "d" else None) for s in sites})
            with steer(model, ms, 1.0):
                tox = toxicity(model, tok, prompts, scorer, progress=False)
                ppl = perplexity(model, tok, neutral)
            print(
                f"{spec:50s} top {f:<5}{rank} toxic {tox.fraction:6.1%} ({base.fraction / max(tox.fraction, 1e-9):4.1f}x)"
                f" ppl ×{ppl / bppl:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
