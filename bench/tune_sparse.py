"""Probe: scale-only Linear-AcT maps at λ = 1 where only the top fraction of each site's neurons
(by |log ω|) is moved, on the hard *tuning* split (never eval prompts).

    python bench/tune_sparse.py MODEL 'attn_post@50%-100%+mlp_post@33.3%-66.7%' 1,0.5,0.25 [...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from actmerge.collect import collect  # noqa: E402
from actmerge.estimators import linear_act  # noqa: E402
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
        specs.append((spec, sorted({s.key: s for s in parts}.values(), key=lambda s: s.order),
                      [(float(f.rstrip("d")), "d" if f.endswith("d") else "l") for f in fracs.split(",")]))
    keys = sorted({s.key for _, ss, _ in specs for s in ss})
    t0 = time.perf_counter()
    xs = collect(model, tok, toxic, keys, progress=False, skip_special=True)
    ys = collect(model, tok, clean, keys, progress=False, skip_special=True)
    print(f"collected {len(keys)} sites in {time.perf_counter() - t0:.0f}s", flush=True)
    fitted = {k: linear_act(xs[k], ys[k], fit_shift=False, degenerate="shift")[0] for k in keys}
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
            print(f"{spec:50s} top {f:<5}{rank} toxic {tox.fraction:6.1%} ({base.fraction / max(tox.fraction, 1e-9):4.1f}x)"
                  f" ppl ×{ppl / bppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
