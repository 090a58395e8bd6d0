"""Collection on a model larger than its memory budget: the synthetic Llama-3.2-3B-shaped checkpoint of
``bench/bake_io.py`` (6.4 GB bf16, 4 shards, random weights, built once and cached) loaded with
accelerate's ``device_map="auto"``, ``max_memory={"cpu": cap}`` below its size and disk offload, and
activations collected at every site (168). Prints, from one run: the device map (modules on cpu /
disk), load and collection time, and the peak RSS of the collecting process vs the checkpoint size
and the cap (also split: the libraries' own baseline, the peak after loading, anonymous vs file-backed
resident memory at the end).

    HF_HUB_OFFLINE=1 python bench/offload.py --max-memory cpu=2GiB --compare-in-memory
    HF_HUB_OFFLINE=1 python bench/offload.py                          # cap = 40 % of the checkpoint
    HF_HUB_OFFLINE=1 python bench/offload.py --small --compare-in-memory   # 7 MB config: checks the path
    HF_HUB_OFFLINE=1 python bench/offload.py --device cuda --max-memory 0=2GiB,cpu=2GiB

Defaults: 32 random sentences of ≤ 32 tokens, batch 16, bfloat16 (the checkpoint's dtype), on the CPU.
The first run builds the checkpoint (see bake_io.py: 6.4 GB of disk, a few minutes). A full-size run
does 2 forward passes of a 3B model in bf16 per collection: minutes on a few idle cores.

``--compare-in-memory`` also collects with the whole model loaded (needs ~7 GiB of RAM) and prints the
time ratio and the largest difference between the two sets of statistics (expected 0: the same kernels
on the same weights). Each collection runs in its own child process, so each peak RSS is its own.

The checkpoint has no tokenizer: the bench links its files into a scratch directory next to a
character-level tokenizer and collects on random character strings, i.e. random token ids. Offloaded
layers are read back from the checkpoint's own safetensors files (through the page cache) at every
forward; nothing is written to the offload folder. Note that transformers keeps CPU weights that need
no conversion memory-mapped: they count as file-backed RSS, which the kernel may evict. To make the
budget a hard limit, run under a memory cgroup, e.g. ``systemd-run --scope -p MemoryMax=4G ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bake_io import CONFIG, SHARD_BYTES, build

from actmerge.models import cache_dir

SMALL = {
    **CONFIG,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2048,
}
CHARS = string.ascii_letters + string.digits + string.punctuation + " "
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def char_tokenizer():
    """One token per printable character (+ pad, bos): strings of random characters = random ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def with_tokenizer(checkpoint: Path, scratch: Path) -> Path:
    """The checkpoint's files linked into ``scratch`` next to a character tokenizer (nothing copied)."""
    view = scratch / "model"
    view.mkdir()
    for f in checkpoint.iterdir():
        (view / f.name).symlink_to(f)
    char_tokenizer().save_pretrained(view)
    return view


def random_sentences(n: int, max_tokens: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(CHARS, k=rng.randint(max_tokens // 2, max_tokens))) for _ in range(n)]


def child(a: argparse.Namespace) -> None:
    """Load (capped or whole), collect, print one JSON line; optionally save the statistics."""
    import transformers  # noqa: F401  (the libraries' own memory: the baseline RSS)
    from safetensors.torch import save_file

    from actmerge.kinds.llm.collect import collect
    from actmerge.memory import peak_rss
    from actmerge.models import ModelSource, load_model
    from actmerge.placement import input_device, offloaded
    from actmerge.sites import architecture_for, resolve_sites

    base_rss = peak_rss()
    src = ModelSource("synthetic-llama", Path(a.view))
    t0 = time.perf_counter()
    model, tok = load_model(
        src,
        dtype=DTYPES[a.dtype],
        device=a.device,
        max_memory=a.max_memory,
        offload_folder=a.offload_folder,
    )
    t_load = time.perf_counter() - t0
    load_rss = peak_rss()
    arch = architecture_for(src.config)
    keys = [s.key for s in resolve_sites(arch, src.config, list(arch.sites), "all")]
    sentences = random_sentences(a.sentences, a.max_tokens)
    t0 = time.perf_counter()
    stats = collect(
        model, tok, sentences, keys, batch_size=a.batch_size, max_tokens=a.max_tokens, progress=False
    )
    if input_device(model).type == "cuda":
        torch.cuda.synchronize()
    t_collect = time.perf_counter() - t0
    if a.save:
        save_file({k.replace(":", "@"): v for k, v in stats.items()}, a.save)
    rss = peak_rss()
    print(
        json.dumps(
            {
                "load_s": t_load,
                "collect_s": t_collect,
                "peak_rss": rss,
                "base_rss": base_rss,
                "load_peak_rss": load_rss,
                "hwm": proc_status(),
                "placement": offloaded(model),
                "sites": len(keys),
                "gpu_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
            }
        )
    )


def proc_status() -> dict[str, int]:
    """Peak and current resident memory by kind (Linux /proc): anonymous vs file-backed (mmap'd
    safetensors pages count while mapped)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def run_child(args: argparse.Namespace, view: Path, max_memory: str | None, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--view", str(view), "--save", str(save)]
    cmd += ["--sentences", str(args.sentences), "--batch-size", str(args.batch_size)]
    cmd += ["--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    if max_memory:
        cmd += ["--max-memory", max_memory, "--offload-folder", str(view.parent / "offload")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(name: str, res: dict, size: int, cap: int | None, n_sentences: int) -> None:
    gib = 2**30
    print(
        f"{name}: device map {res['placement'] or 'none (whole model on one device)'}; "
        f"load {res['load_s']:.1f}s, collection {res['collect_s']:.1f}s at {res['sites']} sites "
        f"({n_sentences / res['collect_s']:.2f} sentences/s)"
    )
    model_rss = res["peak_rss"] - res["base_rss"]
    line = (
        f"  peak RSS {res['peak_rss'] / gib:.2f} GiB, of which {model_rss / gib:.2f} GiB above the "
        f"libraries' own {res['base_rss'] / gib:.2f} GiB = {model_rss / size:.2f} × the checkpoint"
    )
    if cap:
        line += f"; cap {cap / gib:.2f} GiB: excess over the cap {(model_rss - cap) / gib:+.2f} GiB"
    st = res["hwm"]
    line += (
        f"\n  peak after loading {res['load_peak_rss'] / gib:.2f} GiB; at the end resident "
        f"{st.get('VmRSS', 0) / gib:.2f} GiB (anonymous {st.get('RssAnon', 0) / gib:.2f}, "
        f"file-backed {st.get('RssFile', 0) / gib:.2f})"
    )
    if res["gpu_peak"]:
        line += f"; GPU peak {res['gpu_peak'] / gib:.2f} GiB"
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-memory", default=None, help="budget, e.g. cpu=2GiB (default: cpu = 40 %% of size)")
    ap.add_argument(
        "--device", default="cpu", help="cpu (default), or cuda with a GPU budget in --max-memory"
    )
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="bfloat16 = the checkpoint's")
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--compare-in-memory", action="store_true", help="also collect with the whole model")
    ap.add_argument("--small", action="store_true", help="a 4-layer, 10 MB config: checks the code path")
    ap.add_argument("--dir", default=None, help="synthetic checkpoint directory (built if missing)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--view", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--offload-folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    name = "synthetic-llama-small" if args.small else "synthetic-llama-3b"
    path = Path(args.dir) if args.dir else cache_dir() / "bench" / name
    ckpt = build(path, SMALL, 2 * 2**20) if args.small else build(path, CONFIG, SHARD_BYTES)
    shards = sorted(ckpt.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    from actmerge.placement import parse_max_memory

    max_memory = args.max_memory or f"cpu={int(0.4 * size)}"
    cap = parse_max_memory(max_memory).get("cpu")
    print(
        f"checkpoint {ckpt}: {len(shards)} shards, {size / 2**30:.2f} GiB; budget {max_memory}; "
        f"{args.sentences} random sentences of ≤ {args.max_tokens} tokens, batch {args.batch_size}, {args.dtype}"
    )
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as scratch:
        view = with_tokenizer(ckpt, Path(scratch))
        capped = run_child(args, view, max_memory, Path(scratch) / "capped.safetensors")
        report("offloaded", capped, size, cap, args.sentences)
        if args.compare_in_memory:
            whole = run_child(args, view, None, Path(scratch) / "whole.safetensors")
            report("in memory", whole, size, None, args.sentences)
            from safetensors.torch import load_file

            a = load_file(Path(scratch) / "capped.safetensors")
            b = load_file(Path(scratch) / "whole.safetensors")
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            print(
                f"collection time offloaded / in memory = {capped['collect_s'] / whole['collect_s']:.2f}; "
                f"peak RSS offloaded / in memory = {capped['peak_rss'] / whole['peak_rss']:.2f}; "
                f"statistics max |Δ| = {diff:.2g}"
            )


if __name__ == "__main__":
    main()
