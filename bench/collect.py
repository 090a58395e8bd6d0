"""Collection cost: pooled-activation collection at every site vs plain forward passes over the same
batches (ratio, target ≤ 1.15), and the memory of collected statistics vs the number of sentences.

    python bench/collect.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from actmerge.collect import batches, collect
from actmerge.models import load_model, resolve
from actmerge.recipe import read_sentences
from actmerge.sites import architecture_for, resolve_sites

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def plain(model, tok, sentences, batch_size=16, max_tokens=128) -> None:
    for b in batches(tok, sentences, batch_size=batch_size, max_tokens=max_tokens):
        model.base_model(**b.inputs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = resolve("gemma-3-270m")
    model, tok = load_model(src)
    arch = architecture_for(src.config)
    keys = [s.key for s in resolve_sites(arch, src.config, list(arch.sites), "all")]
    sentences = read_sentences(ROOT / "recipes" / "data" / "detox" / "toxic.txt")
    sentences += read_sentences(ROOT / "recipes" / "data" / "detox" / "nontoxic.txt")
    plain(model, tok, sentences[:16])  # warm-up
    t_plain, t_coll = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain(model, tok, sentences)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = collect(model, tok, sentences, keys, progress=False)
        t_coll.append(time.perf_counter() - t0)
    p, c = statistics.median(t_plain), statistics.median(t_coll)
    print(
        f"{len(sentences)} sentences, {len(keys)} sites ({sum(v.shape[1] for v in stats.values())} neurons)"
    )
    print(f"plain forward median {p:.2f}s; collection median {c:.2f}s; ratio {c / p:.3f} (target ≤ 1.15)")
    per_sentence = sum(v.shape[1] for v in stats.values()) * 4
    for n in (100, 1000, 10000):
        print(
            f"  statistics for {n:>6} sentences: {n * per_sentence / 2**20:8.1f} MiB "
            "(one float32 vector per sentence per site; independent of sentence length)"
        )


if __name__ == "__main__":
    main()
