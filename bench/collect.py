"""Collection overhead: pooled activations at every site of Gemma-3-270M (108 sites, 101k neurons) vs
plain forward passes over the same batches, and the memory of the collected statistics vs N.

    HF_HUB_OFFLINE=1 python bench/collect.py --reference            # idle machine: the number to report
    HF_HUB_OFFLINE=1 python bench/collect.py --reference --threads 1 # on a shared machine (steadier)
    HF_HUB_OFFLINE=1 python bench/collect.py --profile              # + torch profiler table of a collection
    HF_HUB_OFFLINE=1 python bench/collect.py --device cuda --dtype bfloat16 --reference

Defaults: all 344 detox sentences, batch 16, ≤ 128 tokens, 5 repeats, torch's thread count, cuda when
present. Batch by batch, plain forward, collection (``actmerge.kinds.llm.collect.collect`` on that batch: hooks
attached, pooled, drained to the CPU) and, with ``--reference``, the pre-optimisation pooling run back
to back in rotating order, so load that drifts hits them alike. Prints, from one run: the median of
per-batch wall-time ratios collection / plain (target ≤ 1.15), the ratio of total wall and of process
CPU time, and the bytes of the statistics (one float32 vector per sentence per site: N × Σ dims × 4,
independent of sentence length). On a shared machine prefer ``--threads 1``: OpenMP threads competing
with another process make whole passes several times slower at random.

``--reference`` times the pooling as it was before the optimisation (a masked float32 temporary of every
``[B, T, D]`` activation at every site — plus a float32 copy for half-precision models — then a NaN check
and a copy to the CPU inside each hook, i.e. two device syncs per site on a GPU) and prints the largest
relative difference of its statistics from the optimised ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import lab
import torch

from actmerge.kinds.llm.collect import batches, collect
from actmerge.kinds.llm.hooks import attach
from actmerge.models import load_model, resolve
from actmerge.placement import input_device
from actmerge.recipe import read_sentences
from actmerge.sites import architecture_for, resolve_sites

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def plain(model, tok, sentences, batch_size, max_tokens) -> None:
    for b in batches(
        tok, sentences, batch_size=batch_size, max_tokens=max_tokens, device=input_device(model)
    ):
        model.base_model(**b.inputs)
    _sync(model)


@torch.no_grad()
def reference(model, tok, sentences, keys, batch_size, max_tokens) -> dict[str, torch.Tensor]:
    """Collection with the pre-optimisation pooling, for a same-run before/after comparison."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    state: dict[str, torch.Tensor] = {}

    def make(key):
        def fn(a):
            m = state["mask"].to(a.device, torch.float32).unsqueeze(-1)
            pooled = (a.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
            if not torch.isfinite(pooled).all():
                raise RuntimeError(key)
            store[key].append(pooled.cpu())

        return fn

    with ExitStack() as stack:
        for k in keys:
            stack.enter_context(attach(model, k, make(k)))
        for b in batches(
            tok, sentences, batch_size=batch_size, max_tokens=max_tokens, device=input_device(model)
        ):
            state["mask"] = b.token_mask
            model.base_model(**b.inputs)
    return {k: torch.cat(v) for k, v in store.items()}


def _sync(model) -> None:
    if input_device(model).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of ``fn(*args)``."""
    w, c = time.perf_counter(), time.process_time()
    res = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=0, help="sentences (default: all 344 detox sentences)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--reference", action="store_true", help="also time the pre-optimisation pooling")
    ap.add_argument("--profile", action="store_true", help="print a torch profiler table of one collection")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    src = resolve("gemma-3-270m")
    model, tok = load_model(src, device=args.device, dtype=DTYPES[args.dtype])
    arch = architecture_for(src.config)
    keys = [s.key for s in resolve_sites(arch, src.config, list(arch.sites), "all")]
    sentences = read_sentences(lab.DATA / "detox" / "toxic.txt")
    sentences += read_sentences(lab.DATA / "detox" / "nontoxic.txt")
    sentences = sentences[: args.n] if args.n else sentences
    bs, mt = args.batch_size, args.max_tokens
    chunks = [sentences[i : i + bs] for i in range(0, len(sentences), bs)]

    def run_collect(batch: list[str]) -> dict[str, torch.Tensor]:
        stats = collect(model, tok, batch, keys, batch_size=bs, max_tokens=mt, progress=False)
        _sync(model)
        return stats

    runs = {"plain": lambda s: plain(model, tok, s, bs, mt), "collect": run_collect}
    if args.reference:
        runs["reference"] = lambda s: reference(model, tok, s, keys, bs, mt)
    for fn in runs.values():  # warm-up (allocator, kernels, page cache)
        fn(chunks[0])
    # Batch by batch, the variants back to back (order rotating): load that drifts on a shared machine
    # hits every variant alike; the median of per-batch ratios is robust to bursts of it.
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        for i, chunk in enumerate(chunks):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                w, c, _ = timed(runs[name], chunk)
                wall[name].append(w)
                cpu[name].append(c)
    stats = collect(model, tok, sentences, keys, batch_size=bs, max_tokens=mt, progress=False)
    dims = sum(v.shape[1] for v in stats.values())
    print(
        f"{len(sentences)} sentences, batch {bs}, {len(keys)} sites ({dims} neurons), {args.dtype} on "
        f"{input_device(model)}, {torch.get_num_threads()} threads, {args.repeats} repeats × {len(chunks)} batches"
    )
    for name in names:
        print(
            f"  {name:<9} wall total {sum(wall[name]) / args.repeats:7.2f}s per pass   CPU {sum(cpu[name]) / args.repeats:7.2f}s"
        )
    for name in names[1:]:
        paired = [a / b for a, b in zip(wall[name], wall["plain"], strict=True)]
        print(
            f"{name} / plain: median per-batch wall ratio {statistics.median(paired):.3f}; "
            f"total wall {sum(wall[name]) / sum(wall['plain']):.3f}; CPU time {sum(cpu[name]) / sum(cpu['plain']):.3f}"
            + ("   (target ≤ 1.15)" if name == "collect" else "")
        )
    if args.reference:
        ref = reference(model, tok, sentences, keys, bs, mt)
        diff = max(float((stats[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in keys)
        print(f"statistics, optimised vs reference pooling: max relative difference {diff:.1e}")
    held = sum(v.numel() * v.element_size() for v in stats.values())
    print(
        f"statistics held for N = {len(sentences)}: {held / 2**20:.2f} MiB ({held // len(sentences):,} B/sentence)"
    )
    for n in (1_000, 10_000, 100_000):
        print(
            f"  N = {n:>7,}: {n * dims * 4 / 2**20:9.1f} MiB "
            "(one float32 vector per sentence per site; independent of sentence length)"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            runs["collect"](sentences)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
