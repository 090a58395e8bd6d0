"""Bake step alone (fit excluded) vs a plain copy of the source safetensors files, in one run.

    python bench/bake_vs_copy.py [--model gemma-3-270m] [--recipe recipes/detox.yaml] [--repeats 5]

Fits the recipe once (not timed), then alternates: copy the source weight files to a scratch dir;
bake (plan + streaming write + provenance + card) to a scratch dir. Prints the median of each and
their ratio. Target (issue #2): bake ≤ 2× copy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from actmerge import pipeline
from actmerge.models import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument(
        "--recipe", default=str(Path(__file__).resolve().parent.parent / "recipes" / "detox.yaml")
    )
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    source = resolve(args.model)
    loaded = pipeline.Loaded(source)
    maps = pipeline.fit(loaded, args.recipe, progress=False, log=lambda *_: None).maps
    files = source.safetensors_files()
    size = sum(f.stat().st_size for f in files)
    copies, bakes = [], []
    with tempfile.TemporaryDirectory(dir=Path(args.recipe).resolve().parent.parent) as scratch:
        scratch = Path(scratch)
        for i in range(args.repeats):
            dest = scratch / f"copy{i}"
            dest.mkdir()
            t0 = time.perf_counter()
            for f in files:
                shutil.copyfile(f, dest / f.name)
            copies.append(time.perf_counter() - t0)
            shutil.rmtree(dest)

            t0 = time.perf_counter()
            (res,) = pipeline.bake(
                loaded,
                maps=maps,
                options=pipeline.BakeOptions(strengths=[args.strength], out=scratch / f"bake{i}"),
                progress=False,
                log=lambda _: None,
            )
            plan = res.plan
            bakes.append(time.perf_counter() - t0)
            shutil.rmtree(scratch / f"bake{i}")
    c, b = statistics.median(copies), statistics.median(bakes)
    print(
        f"model {args.model}: {len(files)} safetensors file(s), {size / 2**20:.0f} MiB; "
        f"{sum(1 for s in plan.sites if s.exactness != 'identity')} maps folded at λ={args.strength:g}"
    )
    print(f"plain copy of the weight files: median {c:.3f}s over {args.repeats} runs")
    print(f"bake (plan + write + provenance): median {b:.3f}s over {args.repeats} runs")
    print(f"ratio bake / copy = {b / c:.2f} (target ≤ 2.0)")


if __name__ == "__main__":
    main()
