"""Inference speed: baked Gemma-3-270M vs the base model vs the hooked model (same maps), greedy
generation of the same prompts, interleaved repetitions, in one run.

    python bench/inference.py [--baked out/gemma-3-270m-detox] [--repeats 5] [--new-tokens 64]

Prints tokens/s of each and the ratios baked/base (target ≥ 0.99: zero overhead) and hooked/base.
If --baked does not exist, the detox recipe is baked into a temp dir first (not timed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lab
import torch
from transformers import AutoModelForCausalLM

from actmerge import pipeline
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import load_model, resolve

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The history of the bicycle begins",
    "In the kitchen, my grandmother always",
    "The train left the station and",
    "Scientists studying the ocean have found",
    "My favourite thing about autumn is",
    "The meeting started late because",
    "On the first day of school, the teacher",
    "The old lighthouse keeper looked out",
]


@torch.no_grad()
def tokens_per_second(model, tok, new_tokens: int) -> float:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        top_k=None,
        top_p=None,
        pad_token_id=tok.pad_token_id,
    )
    dt = time.perf_counter() - t0
    return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baked", default=str(ROOT / "out" / "gemma-3-270m-detox"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    src = resolve("gemma-3-270m")
    base, tok = load_model(src)
    baked_dir = Path(args.baked)
    tmp = None
    if not (baked_dir / "config.json").is_file():
        tmp = tempfile.TemporaryDirectory()
        baked_dir = Path(tmp.name) / "baked"
        pipeline.bake(
            pipeline.Loaded(src),
            recipe=lab.RECIPES / "detox.yaml",
            options=pipeline.BakeOptions(strengths=[1.0], out=baked_dir),
            progress=False,
            log=lambda *_: None,
        )
    baked = AutoModelForCausalLM.from_pretrained(str(baked_dir), dtype=torch.float32).eval()
    maps = MapSet.load(baked_dir / "actmerge" / "maps.safetensors")
    tokens_per_second(base, tok, 8)  # warm-up
    tokens_per_second(baked, tok, 8)
    runs: dict[str, list[float]] = {"base": [], "baked": [], "hooked": []}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        runs["base"].append(tokens_per_second(base, tok, args.new_tokens))
        runs["baked"].append(tokens_per_second(baked, tok, args.new_tokens))
        with steer(base, maps, 1.0):
            runs["hooked"].append(tokens_per_second(base, tok, args.new_tokens))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"greedy, {len(PROMPTS)} prompts × {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved runs ({len(maps)} maps)"
    )
    for k, v in med.items():
        print(f"  {k:7s} {v:8.1f} tok/s   runs: {', '.join(f'{x:.0f}' for x in runs[k])}")
    print(f"ratio baked / base  = {med['baked'] / med['base']:.3f} (target ≥ 0.99)")
    print(
        f"ratio hooked / base = {med['hooked'] / med['base']:.3f} (hook overhead {1 - med['hooked'] / med['base']:+.1%})"
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
