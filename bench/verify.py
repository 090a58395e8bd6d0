"""``verify`` vs its floor — loading both models and one forward of each — in one run.

    python bench/verify.py [--model gemma-3-270m] [--baked DIR] [--rounds 3] [--device cpu]

If ``--baked`` is not a checkpoint yet, ``recipes/detox.yaml`` is fitted and baked there first (not
timed; default: a temp dir). Rounds alternate: the floor (load the base model with its tokenizer,
one forward of the verify prompts; the same for the baked checkpoint, in this process) and
``pipeline.verify`` from scratch (it loads the base model itself; the baked one in a fresh
process), then ``pipeline.verify`` reusing the loaded base model (as ``bake --verify`` does).
Prints the medians and the ratio verify / floor. Target (issue #15): ≤ 1.5.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import lab
import torch

from actmerge import pipeline
from actmerge.kinds.llm.verify import DEFAULT_PROMPTS
from actmerge.models import ModelSource, load_model, resolve
from actmerge.placement import Placement


@torch.no_grad()
def floor(sources: list[ModelSource], device: str) -> float:
    """Seconds to load each model (float32, as verify does) and run one forward of the prompts."""
    t0 = time.perf_counter()
    for source in sources:
        model, tok = load_model(source, device=device)
        enc = tok(DEFAULT_PROMPTS, return_tensors="pt", padding=True).to(device)
        model(**enc).logits.float().cpu()
        del model, tok
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--baked", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        baked = args.baked or Path(scratch) / "baked"
        base = resolve(args.model)
        if not (baked / "config.json").is_file():
            pipeline.bake(
                pipeline.Loaded(base, args.device),
                recipe=lab.RECIPES / "detox.yaml",
                options=pipeline.BakeOptions(out=baked),
                progress=False,
                log=lambda *_: None,
            )
        quiet = dict(options=pipeline.VerifyOptions(placement=Placement(args.device)), log=lambda *_: None)
        floors, fresh, reuse = [], [], []
        loaded = pipeline.Loaded(base, args.device)
        for _ in range(args.rounds):
            floors.append(floor([base, ModelSource("baked", baked)], args.device))
            gc.collect()
            t0 = time.perf_counter()
            rep = pipeline.verify(baked, **quiet)
            fresh.append(time.perf_counter() - t0)
            assert rep.passed, rep
            gc.collect()
            loaded.get()  # loaded once, outside the timing: bake has it already
            t0 = time.perf_counter()
            pipeline.verify(baked, base=loaded, **quiet)
            reuse.append(time.perf_counter() - t0)
    f, v, r = (statistics.median(x) for x in (floors, fresh, reuse))
    print(
        f"model {args.model}, {len(DEFAULT_PROMPTS)} prompts, {torch.get_num_threads()} threads, {args.device}"
    )
    print(f"floor (load both models + one forward each): median {f:.2f}s over {args.rounds} rounds")
    print(f"verify: median {v:.2f}s; ratio verify / floor: {v / f:.2f} (target ≤ 1.5)")
    print(f"verify reusing the loaded base model: median {r:.2f}s; ratio {r / f:.2f}")
    print(f"max |Δlogit| {rep.max_abs_logit_diff:.3g}, greedy agreement {rep.greedy_agreement:.1%}")


if __name__ == "__main__":
    main()
