"""A LinEAS step vs one plain forward+backward of the same batch through the same layers, in one run.

    python bench/lineas_step.py [--model gemma-3-270m] [--recipe recipes/detox-lineas.yaml]
                                [--batch 32] [--rounds 5] [--steps 4] [--threads N] [--device cpu]

The batch is the recipe's first ``batch`` source sentences (every LinEAS step draws exactly those),
the target is the pooled activations of its first ``batch`` target sentences (collected once, not
timed). Rounds alternate: a LinEAS fit of ``steps`` steps with the recipe's settings (a step is
timed from one optimiser step to the next, so the first step and the set-up are not counted), then
``steps`` plain passes: the same tokens through the body with the embeddings requiring grad, cut
after the last site of the recipe, backward of the sum of that site's activation (no hooks, no
loss, no optimiser). Prints the medians and their ratio. Target (issue #15): ratio ≤ 1.25.
Interleaved rounds and medians keep the ratio fair on a CPU shared with other jobs.
``--also FILE`` times a second ``lineas.py`` (e.g. an older one: ``git show REV:actmerge/lineas.py``)
in the same rounds, for before/after numbers under the same load.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import lab
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from actmerge import pipeline
from actmerge.kinds.llm import fit as llm_fit
from actmerge.kinds.llm.collect import CollectOptions, batches, collect
from actmerge.kinds.llm.hooks import attach
from actmerge.lineas import LineasConfig, fit_lineas
from actmerge.models import resolve
from actmerge.recipe import load_recipe
from actmerge.recipe_sections import sections_of as sections
from actmerge.sites import architecture_for


class _Cut(Exception):
    pass


def plain_step(model, inputs: dict, last: str) -> float:
    """Seconds of one forward (cut after ``last``) + backward, gradients w.r.t. the embeddings."""
    held = {}

    def grab(a):
        held["a"] = a
        raise _Cut

    def leaf(_mod, _args, out):
        return out.detach().requires_grad_()

    t0 = time.perf_counter()
    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        with attach(model, last, grab):
            model.base_model(**inputs, use_cache=False)
    except _Cut:
        pass
    finally:
        handle.remove()
    held["a"].float().sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(lab.RECIPES / "detox-lineas.yaml"))
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="LinEAS steps (and plain passes) per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--also", type=Path, help="another lineas.py to time in the same rounds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    loaded = pipeline.Loaded(resolve(args.model), args.device)
    model, tok = loaded.get()
    config = loaded.source.config
    o = sections(recipe, architecture_for(config)).fit.lineas
    batch = args.batch or o.batch
    sites = llm_fit.recipe_sites(recipe, config)
    keys = [s.key for s in sites]
    last = max(sites, key=lambda s: s.order).key
    source = recipe.read_source()[:batch]
    kw = dict(max_tokens=recipe.max_tokens, skip_special=sections(recipe).fit.skip_special)
    target = collect(
        model, tok, recipe.read_target()[:batch], keys, pooling=recipe.pooling, progress=False, **kw
    )
    frozen = llm_fit.frozen_shifts(recipe, config, sites)
    cfg = LineasConfig(
        steps=args.steps,
        lr=o.lr,
        lr_min=o.lr_min,
        batch=batch,
        l1=o.l1,
        group=o.group,
        loss_norm=o.loss_norm,
        param=o.param,
        seed=recipe.seed,
    )
    (b,) = batches(tok, source, batch_size=batch, device=model.device, **kw)

    fits = {"LinEAS step": fit_lineas}
    if args.also:
        spec = importlib.util.spec_from_file_location("actmerge._lineas_also", args.also)
        other = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        fits[f"LinEAS step ({args.also.name})"] = other.fit_lineas
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    steps: dict[str, list[float]] = {name: [] for name in fits}
    plains = []
    for _ in range(args.rounds):
        for name, fit in fits.items():
            stamps.clear()
            fit(
                model, tok, sites, source, target, frozen_shift=frozen, cfg=cfg,
                collection=CollectOptions(pooling=recipe.pooling, **kw), progress=False, log=lambda *_: None,
            )  # fmt: skip
            steps[name] += [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)]
        plains += [plain_step(model, b.inputs, last) for _ in range(args.steps)]
    p = statistics.median(plains)
    n_tok = int(b.inputs["attention_mask"].sum())
    print(
        f"model {args.model}, recipe {recipe.name}: {len(sites)} sites, "
        f"{sum(v.shape[1] for v in target.values())} neurons; batch {batch} sentences "
        f"({tuple(b.inputs['input_ids'].shape)}, {n_tok} tokens), {torch.get_num_threads()} threads, {args.device}"
    )
    print(f"plain forward+backward to {last}: median {p:.3f}s over {len(plains)} passes")
    for name, times in steps.items():
        s = statistics.median(times)
        print(f"{name}: median {s:.3f}s over {len(times)} steps ({args.rounds} rounds)")
        print(f"  ratio step / forward+backward: {s / p:.2f} (target ≤ 1.25)")


if __name__ == "__main__":
    main()
